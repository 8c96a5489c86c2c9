package agent

import (
	"crypto/tls"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	authzv1 "k8s.io/api/authorization/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

// startMetrics runs the agent's metrics server for cfg until the test
// ends and returns its address.
func startMetrics(t *testing.T, cfg Config, reviews kubernetes.Interface) string {
	t.Helper()
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	a := New(cfg, slog.New(slog.DiscardHandler), io.Discard)
	srv, l, err := a.metricsServer(reviews)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(l)
	}()
	t.Cleanup(func() {
		srv.Close()
		<-done
	})
	return l.Addr().String()
}

type response struct {
	code int
	body string
}

func request(t *testing.T, c *http.Client, url, token string) response {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return response{resp.StatusCode, string(b)}
}

// The health endpoints say this much and no more, in every mode.
func checkHealth(t *testing.T, c *http.Client, base string) {
	t.Helper()
	if r := request(t, c, base+"/healthz", ""); r.code != http.StatusOK || r.body != "ok\n" {
		t.Errorf("/healthz without credentials: %d %q", r.code, r.body)
	}
	if r := request(t, c, base+"/readyz", ""); r.code != http.StatusServiceUnavailable || r.body != "datapath not loaded\n" {
		t.Errorf("/readyz without credentials: %d %q", r.code, r.body)
	}
}

// The default listener binds loopback only: the node's other addresses
// refuse the connection. It needs no credentials there.
func TestMetricsDefaultIsLoopbackOnly(t *testing.T) {
	cfg := Defaults()
	host, _, err := net.SplitHostPort(cfg.MetricsAddr)
	if err != nil {
		t.Fatal(err)
	}
	cfg.MetricsAddr = net.JoinHostPort(host, "0") // the default's host, any free port
	addr := startMetrics(t, cfg, nil)
	ta, err := net.ResolveTCPAddr("tcp", addr)
	if err != nil || !ta.IP.IsLoopback() {
		t.Fatalf("default metrics listener on %s (%v), want loopback", addr, err)
	}

	c := &http.Client{Timeout: 10 * time.Second}
	base := "http://" + addr
	if r := request(t, c, base+"/metrics", ""); r.code != http.StatusOK || !strings.Contains(r.body, "pktmeta_agent_attach_errors_total") {
		t.Errorf("/metrics on loopback: %d %.200q", r.code, r.body)
	}
	checkHealth(t, c, base)

	addrs, err := net.InterfaceAddrs()
	if err != nil {
		t.Fatal(err)
	}
	tried := 0
	for _, a := range addrs {
		ipn, ok := a.(*net.IPNet)
		if !ok || ipn.IP.IsLoopback() || ipn.IP.IsLinkLocalUnicast() {
			continue
		}
		tried++
		other := net.JoinHostPort(ipn.IP.String(), strconv.Itoa(ta.Port))
		if conn, err := net.DialTimeout("tcp", other, 5*time.Second); err == nil {
			conn.Close()
			t.Errorf("the default metrics listener answers on %s", other)
		}
	}
	if tried == 0 {
		t.Log("no non-loopback address on this host to try")
	}
}

// fakeAPI knows "prom" (allowed get /metrics) and "alice" (authenticated,
// no permission); other tokens are refused.
func fakeAPI() (*fake.Clientset, *atomic.Int32, *atomic.Int32) {
	cs := fake.NewClientset()
	var trs, sars atomic.Int32
	cs.PrependReactor("create", "tokenreviews", func(action k8stesting.Action) (bool, runtime.Object, error) {
		trs.Add(1)
		tr := action.(k8stesting.CreateAction).GetObject().(*authnv1.TokenReview).DeepCopy()
		switch tr.Spec.Token {
		case "prom":
			tr.Status = authnv1.TokenReviewStatus{Authenticated: true, User: authnv1.UserInfo{Username: "system:serviceaccount:monitoring:prometheus"}}
		case "alice":
			tr.Status = authnv1.TokenReviewStatus{Authenticated: true, User: authnv1.UserInfo{Username: "alice"}}
		default:
			tr.Status = authnv1.TokenReviewStatus{Error: "invalid token"}
		}
		return true, tr, nil
	})
	cs.PrependReactor("create", "subjectaccessreviews", func(action k8stesting.Action) (bool, runtime.Object, error) {
		sars.Add(1)
		sar := action.(k8stesting.CreateAction).GetObject().(*authzv1.SubjectAccessReview).DeepCopy()
		na := sar.Spec.NonResourceAttributes
		sar.Status.Allowed = sar.Spec.User == "system:serviceaccount:monitoring:prometheus" && na != nil && na.Path == "/metrics" && na.Verb == "get"
		return true, sar, nil
	})
	return cs, &trs, &sars
}

// metricsAuth kubernetes: HTTPS; /metrics for an authorized token only,
// decisions cached; health without credentials.
func TestMetricsAuthKubernetes(t *testing.T) {
	cs, trs, sars := fakeAPI()
	cfg := Defaults()
	cfg.MetricsAddr, cfg.MetricsAuth = "127.0.0.1:0", MetricsAuthKubernetes
	addr := startMetrics(t, cfg, cs)
	// As Prometheus with insecure_skip_verify scrapes a self-signed agent.
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	base := "https://" + addr

	for _, tc := range []struct {
		name, token string
		code        int
	}{
		{"anonymous", "", http.StatusUnauthorized},
		{"token the TokenReview rejects", "forged", http.StatusUnauthorized},
		{"authenticated without get /metrics", "alice", http.StatusForbidden},
		{"authorized", "prom", http.StatusOK},
	} {
		r := request(t, c, base+"/metrics", tc.token)
		if r.code != tc.code {
			t.Errorf("%s: %d %.200q, want %d", tc.name, r.code, r.body, tc.code)
		}
		if got := strings.Contains(r.body, "pktmeta_"); got != (tc.code == http.StatusOK) {
			t.Errorf("%s: metrics in the answer: %v", tc.name, got)
		}
	}
	if trs.Load() != 3 || sars.Load() != 2 {
		t.Fatalf("%d TokenReviews and %d SubjectAccessReviews, want 3 and 2", trs.Load(), sars.Load())
	}
	// Later scrapes use the cached decisions.
	for range 3 {
		if r := request(t, c, base+"/metrics", "prom"); r.code != http.StatusOK {
			t.Fatalf("cached scrape: %d", r.code)
		}
		request(t, c, base+"/metrics", "alice")
	}
	if trs.Load() != 3 || sars.Load() != 2 {
		t.Errorf("after cached scrapes: %d TokenReviews and %d SubjectAccessReviews, want still 3 and 2", trs.Load(), sars.Load())
	}

	checkHealth(t, c, base)
	if trs.Load() != 3 {
		t.Error("health checks asked the API server")
	}

	// Plain HTTP gets nothing.
	plain := &http.Client{Timeout: 10 * time.Second}
	if r := request(t, plain, "http://"+addr+"/metrics", "prom"); r.code != http.StatusBadRequest || strings.Contains(r.body, "pktmeta_") {
		t.Errorf("plain HTTP to the HTTPS listener: %d %.200q", r.code, r.body)
	}
}

// No API, no authenticated mode: the agent does not start rather than
// serve /metrics unguarded.
func TestMetricsAuthNeedsAPI(t *testing.T) {
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	cfg := Defaults()
	cfg.MetricsAddr, cfg.MetricsAuth = "127.0.0.1:0", MetricsAuthKubernetes
	a := New(cfg, slog.New(slog.DiscardHandler), io.Discard)
	srv, err := a.serveMetrics(make(chan error, 1))
	if err == nil {
		srv.Close()
		t.Fatal("served metricsAuth kubernetes without an API client")
	}
	if !strings.Contains(err.Error(), "review tokens") {
		t.Errorf("error %v", err)
	}
	if _, _, err := a.metricsServer(nil); err == nil {
		t.Error("metricsServer without a review client")
	}
}
