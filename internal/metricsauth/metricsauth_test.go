package metricsauth

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	authzv1 "k8s.io/api/authorization/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

// apiServer is a fake API server that knows three tokens: "prom" (a
// scraper bound to the reader role), "alice" (authenticated, no role)
// and anything else (refused). failing makes every review an error.
type apiServer struct {
	*fake.Clientset
	tokenReviews, accessReviews atomic.Int32
	failing                     atomic.Bool

	mu   sync.Mutex
	sars []authzv1.SubjectAccessReviewSpec
}

const promUser = "system:serviceaccount:monitoring:prometheus"

func newAPIServer() *apiServer {
	s := &apiServer{Clientset: fake.NewClientset()}
	s.PrependReactor("create", "tokenreviews", func(action k8stesting.Action) (bool, runtime.Object, error) {
		s.tokenReviews.Add(1)
		if s.failing.Load() {
			return true, nil, errors.New("connection refused")
		}
		tr := action.(k8stesting.CreateAction).GetObject().(*authnv1.TokenReview).DeepCopy()
		switch tr.Spec.Token {
		case "prom":
			tr.Status = authnv1.TokenReviewStatus{Authenticated: true, Audiences: []string{"https://kubernetes.default.svc"}, User: authnv1.UserInfo{
				Username: promUser, UID: "u-1", Groups: []string{"system:serviceaccounts", "system:serviceaccounts:monitoring"},
				Extra: map[string]authnv1.ExtraValue{"authentication.kubernetes.io/pod-name": {"prometheus-0"}},
			}}
		case "alice":
			tr.Status = authnv1.TokenReviewStatus{Authenticated: true, Audiences: []string{"https://kubernetes.default.svc"}, User: authnv1.UserInfo{Username: "alice"}}
		default:
			tr.Status = authnv1.TokenReviewStatus{Error: "invalid bearer token"}
		}
		return true, tr, nil
	})
	s.PrependReactor("create", "subjectaccessreviews", func(action k8stesting.Action) (bool, runtime.Object, error) {
		s.accessReviews.Add(1)
		if s.failing.Load() {
			return true, nil, errors.New("connection refused")
		}
		sar := action.(k8stesting.CreateAction).GetObject().(*authzv1.SubjectAccessReview).DeepCopy()
		s.mu.Lock()
		s.sars = append(s.sars, sar.Spec)
		s.mu.Unlock()
		na := sar.Spec.NonResourceAttributes
		sar.Status.Allowed = sar.Spec.User == promUser && sar.Spec.ResourceAttributes == nil && na != nil && na.Path == "/metrics" && na.Verb == "get"
		return true, sar, nil
	})
	return s
}

func (s *apiServer) calls() string {
	return fmt.Sprintf("%d TokenReviews, %d SubjectAccessReviews", s.tokenReviews.Load(), s.accessReviews.Load())
}

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// guarded serves "secret" at /metrics behind an Authorizer.
func guarded(t *testing.T, api *apiServer, opts Options) (*httptest.Server, *Authorizer, *clock) {
	t.Helper()
	a := New(api, opts)
	c := &clock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	a.now = c.now
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", a.Wrap(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "" {
			t.Error("the guarded handler sees the caller's token")
		}
		io.WriteString(w, "secret\n")
	})))
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv, a, c
}

func get(t *testing.T, url, auth string) (int, string) {
	t.Helper()
	code, body, err := fetch(url, auth)
	if err != nil {
		t.Fatal(err)
	}
	return code, body
}

func fetch(url, auth string) (int, string, error) {
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return 0, "", err
	}
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	c := http.Client{Timeout: 10 * time.Second}
	resp, err := c.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

func TestDecisions(t *testing.T) {
	api := newAPIServer()
	srv, _, _ := guarded(t, api, Options{})
	u := srv.URL + "/metrics"
	for _, tc := range []struct {
		name, auth string
		code       int
		tr, sar    int32 // reviews made so far
	}{
		{"anonymous", "", http.StatusUnauthorized, 0, 0},
		{"not a bearer token", "Basic cHJvbTpwcm9t", http.StatusUnauthorized, 0, 0},
		{"empty bearer token", "Bearer ", http.StatusUnauthorized, 0, 0},
		{"token the API server refuses", "Bearer forged", http.StatusUnauthorized, 1, 0},
		{"user without the permission", "Bearer alice", http.StatusForbidden, 2, 1},
		{"authorized scraper", "Bearer prom", http.StatusOK, 3, 2},
		{"scheme in any case", "bearer prom", http.StatusOK, 3, 2},
	} {
		code, body := get(t, u, tc.auth)
		if code != tc.code || (code == http.StatusOK) != (body == "secret\n") {
			t.Errorf("%s: %d %q, want %d", tc.name, code, body, tc.code)
		}
		if code != http.StatusOK && strings.Contains(body, "secret") {
			t.Errorf("%s: refused but got the content", tc.name)
		}
		if api.tokenReviews.Load() != tc.tr || api.accessReviews.Load() != tc.sar {
			t.Errorf("%s: after it, %s; want %d and %d", tc.name, api.calls(), tc.tr, tc.sar)
		}
	}
	// The review asked about the token's user, with its groups and extra,
	// for get on the non-resource URL.
	api.mu.Lock()
	last := api.sars[len(api.sars)-1]
	api.mu.Unlock()
	if last.User != promUser || last.UID != "u-1" || len(last.Groups) != 2 || last.Extra["authentication.kubernetes.io/pod-name"][0] != "prometheus-0" ||
		last.NonResourceAttributes == nil || *last.NonResourceAttributes != (authzv1.NonResourceAttributes{Path: "/metrics", Verb: "get"}) || last.ResourceAttributes != nil {
		t.Errorf("SubjectAccessReview %+v", last)
	}
}

func TestCache(t *testing.T) {
	api := newAPIServer()
	srv, _, clk := guarded(t, api, Options{AllowTTL: time.Minute, DenyTTL: 10 * time.Second})
	u := srv.URL + "/metrics"
	for i := range 5 {
		if code, _ := get(t, u, "Bearer prom"); code != http.StatusOK {
			t.Fatalf("scrape %d: %d", i, code)
		}
		if code, _ := get(t, u, "Bearer alice"); code != http.StatusForbidden {
			t.Fatalf("alice %d: %d", i, code)
		}
		if code, _ := get(t, u, "Bearer forged"); code != http.StatusUnauthorized {
			t.Fatalf("forged %d: %d", i, code)
		}
	}
	// One review each, whatever the number of requests.
	if api.tokenReviews.Load() != 3 || api.accessReviews.Load() != 2 {
		t.Fatalf("5 rounds of 3 tokens: %s, want 3 and 2", api.calls())
	}
	// Refusals expire first ...
	clk.add(10 * time.Second)
	get(t, u, "Bearer prom")
	get(t, u, "Bearer alice")
	get(t, u, "Bearer forged")
	if api.tokenReviews.Load() != 5 || api.accessReviews.Load() != 3 {
		t.Fatalf("after the deny TTL: %s, want 5 and 3", api.calls())
	}
	// ... the allowed decision after its TTL.
	clk.add(50 * time.Second)
	if code, _ := get(t, u, "Bearer prom"); code != http.StatusOK {
		t.Fatalf("after the allow TTL: %d", code)
	}
	if api.tokenReviews.Load() != 6 || api.accessReviews.Load() != 4 {
		t.Fatalf("after the allow TTL: %s, want 6 and 4", api.calls())
	}
}

// An unreachable API server is 503, and it is not remembered: the next
// request asks again.
func TestAPIErrorsAreNotCached(t *testing.T) {
	api := newAPIServer()
	srv, _, _ := guarded(t, api, Options{})
	u := srv.URL + "/metrics"
	api.failing.Store(true)
	if code, body := get(t, u, "Bearer prom"); code != http.StatusServiceUnavailable || strings.Contains(body, "secret") {
		t.Fatalf("API down: %d %q, want 503", code, body)
	}
	api.failing.Store(false)
	if code, _ := get(t, u, "Bearer prom"); code != http.StatusOK {
		t.Fatalf("API back: %d", code)
	}
	if api.tokenReviews.Load() != 2 {
		t.Errorf("%s: the error was cached", api.calls())
	}
}

func TestCacheIsBounded(t *testing.T) {
	api := newAPIServer()
	srv, a, _ := guarded(t, api, Options{MaxEntries: 4})
	for i := range 20 {
		get(t, srv.URL+"/metrics", fmt.Sprintf("Bearer forged-%d", i))
	}
	a.mu.Lock()
	n := len(a.cache)
	a.mu.Unlock()
	if n > 4 {
		t.Errorf("%d cache entries, want at most 4", n)
	}
}

func TestAudiences(t *testing.T) {
	api := newAPIServer()
	srv, _, _ := guarded(t, api, Options{Audiences: []string{"pktmeta"}})
	if code, _ := get(t, srv.URL+"/metrics", "Bearer prom"); code != http.StatusUnauthorized {
		t.Errorf("token for the API server's audience accepted by a server that wants pktmeta's: %d", code)
	}
}

// Beyond MaxInFlight reviews at once, uncached requests are turned away
// without asking the API server.
func TestInFlightBound(t *testing.T) {
	api := newAPIServer()
	release := make(chan struct{})
	entered := make(chan struct{}, 1)
	api.PrependReactor("create", "tokenreviews", func(k8stesting.Action) (bool, runtime.Object, error) {
		entered <- struct{}{}
		<-release
		return false, nil, nil // on to the reactor that answers
	})
	srv, _, _ := guarded(t, api, Options{MaxInFlight: 1})
	done := make(chan int)
	go func() {
		code, _, _ := fetch(srv.URL+"/metrics", "Bearer prom")
		done <- code
	}()
	<-entered
	code, _, err := fetch(srv.URL+"/metrics", "Bearer alice")
	close(release)
	if err != nil || code != http.StatusServiceUnavailable {
		t.Errorf("second review while one is under way: %d %v, want 503", code, err)
	}
	if code := <-done; code != http.StatusOK {
		t.Errorf("first request: %d", code)
	}
	if n := api.tokenReviews.Load(); n != 1 {
		t.Errorf("%d TokenReviews, want 1", n)
	}
}
