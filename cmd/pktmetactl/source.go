package main

import (
	"context"
	"errors"

	"time"

	"github.com/pktmeta/pktmeta/internal/api"
	"github.com/pktmeta/pktmeta/internal/datapath"
	"github.com/pktmeta/pktmeta/internal/view"
)

// source is where connection data comes from: the agent's API when an
// agent runs (it owns the event stream), the pins otherwise.
type source interface {
	Conns(ctx context.Context) ([]view.Conn, error)
	// Lookup returns errNoRecord when nothing is known of t.
	Lookup(ctx context.Context, t datapath.Tuple) (view.Conn, error)
	// Events calls fn for each event until fn returns false or ctx ends.
	Events(ctx context.Context, fn func(view.Event) bool) error
	Close() error
}

var errNoRecord = errors.New("no record")

// openSource prefers the agent's API socket; an empty socket path means
// pins only.
func openSource(g globals) (source, error) {
	if g.socket != "" {
		if c, err := api.Dial(g.socket); err == nil {
			return apiSource{c}, nil
		}
	}
	d, err := open(g.pinPath)
	if err != nil {
		return nil, err
	}
	return &pinSource{d: d, remote: g.remote()}, nil
}

type apiSource struct{ c *api.Client }

func (s apiSource) Conns(ctx context.Context) ([]view.Conn, error) { return s.c.Conns(ctx) }
func (s apiSource) Close() error                                   { return nil }
func (s apiSource) Events(ctx context.Context, fn func(view.Event) bool) error {
	return s.c.Events(ctx, fn)
}
func (s apiSource) Lookup(ctx context.Context, t datapath.Tuple) (view.Conn, error) {
	c, err := s.c.Lookup(ctx, t)
	if errors.Is(err, api.ErrNotFound) {
		return c, errNoRecord
	}
	return c, err
}

type pinSource struct {
	d      *datapath.Datapath
	remote view.Remote
}

func (s *pinSource) Conns(context.Context) ([]view.Conn, error) { return view.Conns(s.d, s.remote) }
func (s *pinSource) Close() error                               { return s.d.Close() }

func (s *pinSource) Lookup(_ context.Context, t datapath.Tuple) (view.Conn, error) {
	rec, err := s.d.Lookup(t)
	if errors.Is(err, datapath.ErrNoRecord) {
		return view.Conn{}, errNoRecord
	}
	if err != nil {
		return view.Conn{}, err
	}
	res, err := view.NewResolver(s.d)
	if err != nil {
		return view.Conn{}, err
	}
	res.Remote = s.remote
	return res.ConnFromRecord(rec), nil
}

// Events reads the ring buffer directly. Its one consumer position is then
// shared with whoever else reads it; with an agent running, use the API.
func (s *pinSource) Events(ctx context.Context, fn func(view.Event) bool) error {
	return view.FollowEvents(ctx, s.d, s.remote, fn)
}

// idleTimer cancels a context when no event came for d.
type idleTimer struct {
	t      *time.Timer
	fired  chan struct{}
	d      time.Duration
	cancel context.CancelFunc
}

func newIdleTimer(d time.Duration, cancel context.CancelFunc) *idleTimer {
	it := &idleTimer{d: d, cancel: cancel, fired: make(chan struct{})}
	if d > 0 {
		it.t = time.AfterFunc(d, func() { close(it.fired); cancel() })
	}
	return it
}

func (it *idleTimer) reset() {
	if it.t != nil {
		it.t.Reset(it.d)
	}
}

func (it *idleTimer) expired() bool {
	select {
	case <-it.fired:
		return true
	default:
		return false
	}
}
