// Command whoami is an HTTP server that knows who is calling: for every
// request it asks its own socket (one getsockopt, through
// github.com/pktmeta/pktmeta) who opened the connection, logs the caller's
// namespace, pod and tags, and answers with them as JSON. Run it in any
// pod of a node with pktmeta; it needs no privilege.
//
//	whoami -listen :8080
//	curl http://whoami.default.svc:8080/
//	{"namespace":"shop","pod":"frontend-7d9f","tags":{"team":"payments"},...}
//
// With -udp it also answers datagrams on one unconnected UDP socket, as a
// DNS-like server would: right after each receive it asks the socket, which
// then tells the origin of the flow that datagram came on.
//
//	whoami -udp :8081
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

// callerOf turns what the socket said into the answer; err is returned
// when it is neither an answer nor "unknown".
func callerOf(o *pktmeta.ConnOrigin, err error) (caller, error) {
	switch {
	case err == nil:
		return caller{Namespace: o.Namespace, Pod: o.Pod, UID: o.UID, Tags: o.Tags, PodTags: o.PodTags,
			ConnID: o.ConnID, FirstSeen: o.FirstSeen, Remote: o.Remote, Node: o.Node, Service: o.NAT}, nil
	case errors.Is(err, pktmeta.ErrUnknown), errors.Is(err, pktmeta.ErrNotAvailable),
		errors.Is(err, pktmeta.ErrNotConnected): // UDP where the node does not answer unconnected sockets
		return caller{Unknown: err.Error()}, nil
	}
	return caller{}, err
}

// serveUDP answers every datagram on one unconnected socket with who sent
// it. The question follows the receive on the same goroutine: the socket
// is asked about the last datagram it returned.
func serveUDP(log *slog.Logger, addr string) error {
	pc, err := net.ListenPacket("udp", addr)
	if err != nil {
		return err
	}
	u := pc.(*net.UDPConn)
	buf := make([]byte, 2048)
	for {
		_, from, err := u.ReadFromUDPAddrPort(buf)
		if err != nil {
			return err
		}
		c, err := callerOf(pktmeta.Origin(u))
		if err != nil {
			log.Error("ask the socket who opened the flow", "from", from, "err", err)
			continue
		}
		log.Info("datagram", "caller", c.Namespace+"/"+c.Pod, "tags", c.Tags, "podTags", c.PodTags, "from", from, "unknown", c.Unknown)
		b, _ := json.Marshal(c)
		u.WriteToUDPAddrPort(b, from)
	}
}

func main() {
	listen := flag.String("listen", ":8080", "address to serve HTTP on")
	udp := flag.String("udp", "", "address to answer UDP datagrams on (off when empty)")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	if *udp != "" {
		go func() {
			log.Info("serving UDP", "listen", *udp)
			if err := serveUDP(log, *udp); err != nil {
				log.Error("serve UDP", "err", err)
				os.Exit(1)
			}
		}()
	}

	srv := &http.Server{
		Addr: *listen,
		// The request's connection, so the handler can ask its socket.
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, connKey{}, c)
		},
		ReadHeaderTimeout: 10 * time.Second,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			conn := r.Context().Value(connKey{}).(net.Conn)
			c, err := callerOf(pktmeta.Origin(conn))
			switch {
			case err != nil:
				log.Error("ask the socket who opened the connection", "err", err)
				http.Error(w, err.Error(), http.StatusInternalServerError)
				return
			case c.Unknown != "":
				log.Info("request", "caller", "unknown", "from", r.RemoteAddr, "why", c.Unknown, "path", r.URL.Path)
			default:
				log.Info("request", "caller", c.Namespace+"/"+c.Pod, "tags", c.Tags, "podTags", c.PodTags,
					"remoteNode", c.Node, "path", r.URL.Path)
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
