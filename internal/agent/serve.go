package agent

import (
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/pktmeta/pktmeta/internal/metricsauth"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// serveMetrics serves /metrics, /healthz and /readyz on MetricsAddr.
// Ready means the datapath is loaded and the plugin is in the CNI chain.
//
// /metrics names the workloads that talk to each other, so it is guarded
// as MetricsAuth says: on loopback only (the default), or over HTTPS for
// callers whose bearer token the API server vouches for and whose RBAC
// allows "get" on the non-resource URL /metrics. The health endpoints
// share the listener (and its TLS) but never its authentication: the
// kubelet probes them without credentials, they must not depend on the
// API server (an outage there must not restart agents), and they tell
// nothing but "ok" or which of two conditions readiness waits for.
func (a *Agent) serveMetrics(errc chan<- error) (*http.Server, error) {
	var reviews kubernetes.Interface
	if a.cfg.MetricsAuth == MetricsAuthKubernetes {
		cs, err := a.reviewClient()
		if err != nil {
			return nil, fmt.Errorf("metricsAuth %s: %w", MetricsAuthKubernetes, err)
		}
		reviews = cs
	}
	srv, l, err := a.metricsServer(reviews)
	if err != nil {
		return nil, err
	}
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			errc <- fmt.Errorf("metrics: %w", err)
		}
	}()
	a.log.Info("serving metrics", "addr", l.Addr().String(), "auth", a.cfg.MetricsAuth, "https", srv.TLSConfig != nil)
	return srv, nil
}

// metricsServer listens on MetricsAddr and returns the server to run on
// it. reviews is the API client of MetricsAuthKubernetes (nil otherwise).
func (a *Agent) metricsServer(reviews kubernetes.Interface) (*http.Server, net.Listener, error) {
	var metricsHandler http.Handler = promhttp.HandlerFor(a.metrics.Registry, promhttp.HandlerOpts{})
	var tlsConfig *tls.Config
	switch a.cfg.MetricsAuth {
	case MetricsAuthKubernetes:
		if reviews == nil {
			return nil, nil, errors.New("metricsAuth kubernetes needs the Kubernetes API")
		}
		metricsHandler = metricsauth.New(reviews, metricsauth.Options{Log: a.log}).Wrap(metricsHandler)
		var err error
		tlsConfig, err = metricsauth.ServerTLS(a.cfg.MetricsCertFile, a.cfg.MetricsKeyFile, a.certHosts(), a.log)
		if err != nil {
			return nil, nil, fmt.Errorf("metrics TLS: %w", err)
		}
	case MetricsAuthNone, MetricsAuthInsecure:
	default:
		return nil, nil, fmt.Errorf("metricsAuth %q", a.cfg.MetricsAuth)
	}

	mux := http.NewServeMux()
	mux.Handle("GET /metrics", metricsHandler)
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		switch {
		case !a.datapathReady.Load():
			http.Error(w, "datapath not loaded", http.StatusServiceUnavailable)
		case !a.installed.Load():
			http.Error(w, "pktmeta not in the CNI chain yet (waiting for the primary CNI's config?)", http.StatusServiceUnavailable)
		default:
			fmt.Fprintln(w, "ok")
		}
	})
	l, err := net.Listen("tcp", a.cfg.MetricsAddr)
	if err != nil {
		return nil, nil, fmt.Errorf("metrics listener: %w", err)
	}
	srv := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 5 * time.Second,
		IdleTimeout:       2 * time.Minute,
		// TLS handshake errors from port scanners are not the agent's
		// problem: debug level.
		ErrorLog: slog.NewLogLogger(a.log.Handler(), slog.LevelDebug),
	}
	if tlsConfig != nil {
		srv.TLSConfig = tlsConfig
		l = tls.NewListener(l, tlsConfig)
	}
	return srv, l, nil
}

// certHosts are the names of the self-signed certificate. Prometheus
// scrapes the node by address and either skips verification or pins a
// certificate from metricsCertFile, so they matter little; they help a
// human who looks.
func (a *Agent) certHosts() []string {
	hosts := []string{"localhost", "127.0.0.1", "::1", a.cfg.NodeName}
	if h, err := os.Hostname(); err == nil {
		hosts = append(hosts, h)
	}
	if host, _, err := net.SplitHostPort(a.cfg.MetricsAddr); err == nil && net.ParseIP(host) != nil && !net.ParseIP(host).IsUnspecified() {
		hosts = append(hosts, host)
	}
	return hosts
}

// reviewClient is the API client that reviews scrapers' tokens. It is
// not the one of kubeClient: anyone who reaches the metrics port can make
// the agent ask the API server, and with a client of its own, with its
// own rate limit, that never delays the agent's other calls (label tags,
// the uninstall decision on SIGTERM). Without API access there is no
// authenticated mode: the agent refuses to start rather than serve
// /metrics unguarded.
func (a *Agent) reviewClient() (kubernetes.Interface, error) {
	var (
		cfg *rest.Config
		err error
	)
	if a.cfg.Kubeconfig != "" {
		cfg, err = clientcmd.BuildConfigFromFlags("", a.cfg.Kubeconfig)
	} else {
		cfg, err = rest.InClusterConfig()
	}
	if err != nil {
		return nil, fmt.Errorf("no Kubernetes API client to review tokens with: %w", err)
	}
	cfg.UserAgent = "pktmeta-agent"
	cfg.QPS, cfg.Burst = 20, 40
	cfg.Timeout = metricsauth.DefaultTimeout
	return kubernetes.NewForConfig(cfg)
}
