// Package metricsauth guards an HTTP handler with the cluster's own
// identities and RBAC, the way kube-rbac-proxy and controller-runtime's
// filters.WithAuthenticationAndAuthorization do: the caller's bearer
// token is checked with a TokenReview, and the user it names must be
// allowed the request's verb on its non-resource URL ("get" on
// "/metrics") by a SubjectAccessReview. A scraper needs a ClusterRole with
//
//	rules:
//	  - nonResourceURLs: ["/metrics"]
//	    verbs: ["get"]
//
// and the server's own identity needs create on tokenreviews
// (authentication.k8s.io) and subjectaccessreviews
// (authorization.k8s.io).
//
// Decisions are cached for a short while, keyed by a hash of the token,
// so a scraper costs two API calls per TTL rather than per scrape; a
// revoked token or binding keeps working until its decision expires.
// Errors talking to the API server are answered 503 and never cached.
package metricsauth

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	authzv1 "k8s.io/api/authorization/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// Defaults of Options.
const (
	DefaultAllowTTL    = time.Minute
	DefaultDenyTTL     = 10 * time.Second
	DefaultMaxEntries  = 1024
	DefaultMaxInFlight = 8
	DefaultTimeout     = 10 * time.Second
)

// Options tune an Authorizer. Zero values take the defaults.
type Options struct {
	// AllowTTL is how long an allowed decision is reused; DenyTTL how
	// long a refusal (401 or 403) is.
	AllowTTL, DenyTTL time.Duration
	// MaxEntries bounds the cache: tokens nobody reuses must not grow it
	// without end.
	MaxEntries int
	// MaxInFlight bounds the reviews under way at once. Anyone who
	// reaches the port can make the server ask the API server; beyond
	// this, requests whose decision is not cached get 503 at once.
	MaxInFlight int
	// Timeout bounds one request's TokenReview and SubjectAccessReview.
	Timeout time.Duration
	// Audiences, when set, are the audiences the token must be meant
	// for; empty means the API server's own (what a service account
	// token mounted in a pod carries).
	Audiences []string
	// Log receives refusals (403 at info, 401 at debug) and API errors.
	Log *slog.Logger
}

// Authorizer decides whether a request's bearer token may have what it
// asks for.
type Authorizer struct {
	client kubernetes.Interface
	opts   Options
	now    func() time.Time
	sem    chan struct{}

	mu    sync.Mutex
	cache map[cacheKey]decision
}

type cacheKey struct {
	token      [sha256.Size]byte
	verb, path string
}

type decision struct {
	code    int // http.StatusOK, StatusUnauthorized or StatusForbidden
	user    string
	expires time.Time
}

// New returns an Authorizer that asks the API server through client.
func New(client kubernetes.Interface, opts Options) *Authorizer {
	if opts.AllowTTL <= 0 {
		opts.AllowTTL = DefaultAllowTTL
	}
	if opts.DenyTTL <= 0 {
		opts.DenyTTL = DefaultDenyTTL
	}
	if opts.MaxEntries <= 0 {
		opts.MaxEntries = DefaultMaxEntries
	}
	if opts.MaxInFlight <= 0 {
		opts.MaxInFlight = DefaultMaxInFlight
	}
	if opts.Timeout <= 0 {
		opts.Timeout = DefaultTimeout
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	return &Authorizer{client: client, opts: opts, now: time.Now, sem: make(chan struct{}, opts.MaxInFlight), cache: map[cacheKey]decision{}}
}

// Wrap returns next guarded: 401 without a token or with one the API
// server does not accept, 403 when the token's user may not have the
// request (verb from the method, the URL's path), 503 when the API
// server could not be asked. next never sees the Authorization header.
func (a *Authorizer) Wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		token, ok := bearerToken(r)
		if !ok {
			unauthorized(w)
			return
		}
		verb := verbOf(r.Method)
		if verb == "" {
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
			return
		}
		key := cacheKey{token: sha256.Sum256([]byte(token)), verb: verb, path: r.URL.Path}
		d, ok := a.cached(key)
		if !ok {
			select {
			case a.sem <- struct{}{}:
			default:
				w.Header().Set("Retry-After", "1")
				http.Error(w, "too many authentication requests under way", http.StatusServiceUnavailable)
				return
			}
			var err error
			d, err = a.review(r.Context(), token, verb, r.URL.Path)
			<-a.sem
			if err != nil {
				a.opts.Log.Warn("metrics authentication unavailable", "err", err)
				http.Error(w, "authentication unavailable", http.StatusServiceUnavailable)
				return
			}
			a.store(key, d)
		}
		switch d.code {
		case http.StatusOK:
			r.Header.Del("Authorization")
			next.ServeHTTP(w, r)
		case http.StatusUnauthorized:
			unauthorized(w)
		default:
			http.Error(w, fmt.Sprintf("forbidden: user %q may not %s %s", d.user, verb, r.URL.Path), http.StatusForbidden)
		}
	})
}

// bearerToken reads "Authorization: Bearer <token>" as the API server's
// own bearer token authenticator does.
func bearerToken(r *http.Request) (string, bool) {
	parts := strings.SplitN(strings.TrimSpace(r.Header.Get("Authorization")), " ", 3)
	if len(parts) < 2 || !strings.EqualFold(parts[0], "bearer") || parts[1] == "" {
		return "", false
	}
	return parts[1], true
}

// verbOf maps a method to the verb of a non-resource request. Only reads
// are served.
func verbOf(method string) string {
	switch method {
	case http.MethodGet, http.MethodHead:
		return "get"
	}
	return ""
}

func unauthorized(w http.ResponseWriter) {
	w.Header().Set("WWW-Authenticate", `Bearer realm="pktmeta"`)
	http.Error(w, "unauthorized: send a Kubernetes bearer token", http.StatusUnauthorized)
}

// review asks the API server who the token is and whether that user may
// have verb on path.
func (a *Authorizer) review(ctx context.Context, token, verb, path string) (decision, error) {
	ctx, cancel := context.WithTimeout(ctx, a.opts.Timeout)
	defer cancel()
	now := a.now()
	deny := func(code int, user string) decision {
		return decision{code: code, user: user, expires: now.Add(a.opts.DenyTTL)}
	}
	tr, err := a.client.AuthenticationV1().TokenReviews().Create(ctx, &authnv1.TokenReview{
		Spec: authnv1.TokenReviewSpec{Token: token, Audiences: a.opts.Audiences},
	}, metav1.CreateOptions{})
	if err != nil {
		return decision{}, fmt.Errorf("TokenReview: %w", err)
	}
	if !tr.Status.Authenticated {
		a.opts.Log.Debug("metrics request with a token the API server refused", "err", tr.Status.Error)
		return deny(http.StatusUnauthorized, ""), nil
	}
	if len(a.opts.Audiences) > 0 && !slices.ContainsFunc(tr.Status.Audiences, func(s string) bool { return slices.Contains(a.opts.Audiences, s) }) {
		a.opts.Log.Debug("metrics request with a token for other audiences", "audiences", tr.Status.Audiences)
		return deny(http.StatusUnauthorized, ""), nil
	}
	u := tr.Status.User
	if u.Username == "" {
		return decision{}, errors.New("TokenReview authenticated a token without a user name")
	}
	extra := make(map[string]authzv1.ExtraValue, len(u.Extra))
	for k, v := range u.Extra {
		extra[k] = authzv1.ExtraValue(v)
	}
	sar, err := a.client.AuthorizationV1().SubjectAccessReviews().Create(ctx, &authzv1.SubjectAccessReview{
		Spec: authzv1.SubjectAccessReviewSpec{
			User:                  u.Username,
			UID:                   u.UID,
			Groups:                u.Groups,
			Extra:                 extra,
			NonResourceAttributes: &authzv1.NonResourceAttributes{Path: path, Verb: verb},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		return decision{}, fmt.Errorf("SubjectAccessReview: %w", err)
	}
	if !sar.Status.Allowed || sar.Status.Denied {
		a.opts.Log.Info("metrics request forbidden", "user", u.Username, "verb", verb, "path", path, "reason", sar.Status.Reason)
		return deny(http.StatusForbidden, u.Username), nil
	}
	return decision{code: http.StatusOK, user: u.Username, expires: now.Add(a.opts.AllowTTL)}, nil
}

func (a *Authorizer) cached(k cacheKey) (decision, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	d, ok := a.cache[k]
	if !ok {
		return decision{}, false
	}
	if !a.now().Before(d.expires) {
		delete(a.cache, k)
		return decision{}, false
	}
	return d, true
}

func (a *Authorizer) store(k cacheKey, d decision) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.cache) >= a.opts.MaxEntries {
		now := a.now()
		for k, d := range a.cache {
			if !now.Before(d.expires) {
				delete(a.cache, k)
			}
		}
		// Still full: make room at random. Legitimate scrapers are few and
		// come back; whoever fills the cache with fresh tokens only
		// evicts at the rate MaxInFlight lets reviews through.
		for k := range a.cache {
			if len(a.cache) < a.opts.MaxEntries {
				break
			}
			delete(a.cache, k)
		}
	}
	a.cache[k] = d
}
