// Package api is the agent's read-only lookup API: HTTP over a unix socket
// in the agent's run dir, of mode 0600 from the moment it exists, so only
// local root can reach it and no port is opened. pktmetactl uses it when
// it is there, and reads the pins when not.
//
//	GET /v1/conns                                 []view.Conn
//	GET /v1/lookup?proto=tcp&src=IP:PORT&dst=IP:PORT   view.Conn, 404 when unknown
//	GET /v1/events                                view.Event as JSON lines, streamed
//
// Events have one reader in the kernel (the ring buffer's consumer position
// belongs to the agent); the API fans them out to any number of clients.
package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"sync"
	"time"

	"github.com/pktmeta/pktmeta/internal/datapath"
	"github.com/pktmeta/pktmeta/internal/view"
)

// SocketName is the API socket's name in the agent's run dir.
const SocketName = "api.sock"

// DefaultSocket is where pktmetactl looks by default.
const DefaultSocket = "/run/pktmeta/" + SocketName

// Server serves the API.
type Server struct {
	d   *datapath.Datapath
	log *slog.Logger
	// Remote resolves remote origins (nil: their ids only).
	Remote view.Remote

	mu      sync.Mutex
	clients map[chan view.Event]struct{}
}

// NewServer returns a server over d.
func NewServer(d *datapath.Datapath, log *slog.Logger) *Server {
	return &Server{d: d, log: log, clients: map[chan view.Event]struct{}{}}
}

// Publish hands an event to every connected /v1/events client. A client
// that does not keep up loses events rather than slowing the agent.
func (s *Server) Publish(ev view.Event) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.clients {
		select {
		case c <- ev:
		default:
		}
	}
}

// Serve listens on socket until ctx ends. The socket has SocketMode from
// the moment it exists at its path (see listenUnix); a stale one left by
// a crash is replaced, a live one is not.
func (s *Server) Serve(ctx context.Context, socket string) error {
	l, err := listenUnix(socket)
	if err != nil {
		return err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/conns", s.conns)
	mux.HandleFunc("GET /v1/lookup", s.lookup)
	mux.HandleFunc("GET /v1/events", s.events)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	done := make(chan struct{})
	defer close(done)
	go func() {
		select {
		case <-ctx.Done():
			srv.Close()
		case <-done:
		}
	}()
	err = srv.Serve(l) // closes l
	l.remove()
	if err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}

type apiError struct {
	Error string `json:"error"`
}

func (s *Server) conns(w http.ResponseWriter, _ *http.Request) {
	conns, err := view.Conns(s.d, s.Remote)
	if err != nil {
		writeJSON(w, http.StatusInternalServerError, apiError{err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, conns)
}

func (s *Server) lookup(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	t, err := ParseTuple(q.Get("proto"), q.Get("src"), q.Get("dst"))
	if err != nil {
		writeJSON(w, http.StatusBadRequest, apiError{err.Error()})
		return
	}
	rec, err := s.d.Lookup(t)
	if errors.Is(err, datapath.ErrNoRecord) {
		writeJSON(w, http.StatusNotFound, apiError{fmt.Sprintf("no record for %s", t)})
		return
	}
	if err != nil {
		writeJSON(w, http.StatusInternalServerError, apiError{err.Error()})
		return
	}
	res, err := view.NewResolver(s.d)
	if err != nil {
		writeJSON(w, http.StatusInternalServerError, apiError{err.Error()})
		return
	}
	res.Remote = s.Remote
	writeJSON(w, http.StatusOK, res.ConnFromRecord(rec))
}

func (s *Server) events(w http.ResponseWriter, r *http.Request) {
	flusher, ok := w.(http.Flusher)
	if !ok {
		writeJSON(w, http.StatusInternalServerError, apiError{"streaming unsupported"})
		return
	}
	c := make(chan view.Event, 1024)
	s.mu.Lock()
	s.clients[c] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.clients, c)
		s.mu.Unlock()
	}()
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	flusher.Flush()
	enc := json.NewEncoder(w)
	for {
		select {
		case <-r.Context().Done():
			return
		case ev := <-c:
			if err := enc.Encode(ev); err != nil {
				return
			}
			flusher.Flush()
		}
	}
}

// ParseTuple reads a tuple from its parts: tcp|udp, IP:PORT, IP:PORT
// ([IPv6]:PORT).
func ParseTuple(proto, src, dst string) (datapath.Tuple, error) {
	p, err := datapath.ParseProto(proto)
	if err != nil {
		return datapath.Tuple{}, fmt.Errorf("proto: %w", err)
	}
	s, err := parseAddrPort(src)
	if err != nil {
		return datapath.Tuple{}, fmt.Errorf("src: %w", err)
	}
	d, err := parseAddrPort(dst)
	if err != nil {
		return datapath.Tuple{}, fmt.Errorf("dst: %w", err)
	}
	return datapath.Tuple{Proto: p, Src: s, Dst: d}, nil
}

func parseAddrPort(s string) (netip.AddrPort, error) {
	if s == "" {
		return netip.AddrPort{}, errors.New("missing, want IP:PORT or [IPv6]:PORT")
	}
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("%q: want IP:PORT or [IPv6]:PORT", s)
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
}
