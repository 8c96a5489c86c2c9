// Command whoami is an HTTP server that knows who is calling: for every
// request it asks its own socket (one getsockopt, through
// github.com/pktmeta/pktmeta) who opened the connection, logs the caller's
// namespace, pod and tags, and answers with them as JSON. Run it in any
// pod of a node with pktmeta; it needs no privilege.
//
//	whoami -listen :8080
//	curl http://whoami.default.svc:8080/
//	{"namespace":"shop","pod":"frontend-7d9f","tags":{"team":"payments"},...}
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"log/slog"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/pktmeta/pktmeta"
)

type connKey struct{}

// caller is what the server answers: who opened the connection the
// request came on, or why it cannot tell.
type caller struct {
	Namespace string            `json:"namespace,omitempty"`
	Pod       string            `json:"pod,omitempty"`
	UID       string            `json:"uid,omitempty"`
	Tags      map[string]string `json:"tags,omitempty"`
	PodTags   map[string]string `json:"podTags,omitempty"`
	ConnID    uint64            `json:"connId,omitempty"`
	FirstSeen time.Time         `json:"firstSeen,omitzero"`
	Remote    bool              `json:"remote,omitempty"`
	Node      uint16            `json:"node,omitempty"`
	Service   bool              `json:"viaService,omitempty"`
	Unknown   string            `json:"unknown,omitempty"`
}

func main() {
	listen := flag.String("listen", ":8080", "address to serve HTTP on")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))

	srv := &http.Server{
		Addr: *listen,
		// The request's connection, so the handler can ask its socket.
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, connKey{}, c)
		},
		ReadHeaderTimeout: 10 * time.Second,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			conn := r.Context().Value(connKey{}).(net.Conn)
			var c caller
			o, err := pktmeta.Origin(conn)
			switch {
			case err == nil:
				c = caller{Namespace: o.Namespace, Pod: o.Pod, UID: o.UID, Tags: o.Tags, PodTags: o.PodTags,
					ConnID: o.ConnID, FirstSeen: o.FirstSeen, Remote: o.Remote, Node: o.Node, Service: o.NAT}
				log.Info("request", "caller", o.Namespace+"/"+o.Pod, "tags", o.Tags, "podTags", o.PodTags,
					"remoteNode", o.Node, "path", r.URL.Path)
			case errors.Is(err, pktmeta.ErrUnknown), errors.Is(err, pktmeta.ErrNotAvailable):
				c.Unknown = err.Error()
				log.Info("request", "caller", "unknown", "from", r.RemoteAddr, "why", err, "path", r.URL.Path)
			default:
				log.Error("ask the socket who opened the connection", "err", err)
				http.Error(w, err.Error(), http.StatusInternalServerError)
				return
			}
			w.Header().Set("Content-Type", "application/json")
			json.NewEncoder(w).Encode(c)
		}),
	}
	log.Info("serving", "listen", *listen)
	if err := srv.ListenAndServe(); err != nil {
		log.Error("serve", "err", err)
		os.Exit(1)
	}
}
