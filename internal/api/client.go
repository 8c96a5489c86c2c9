package api

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"

	"github.com/pktmeta/pktmeta/internal/datapath"
	"github.com/pktmeta/pktmeta/internal/view"
)

// ErrNotFound is a lookup that found no record.
var ErrNotFound = errors.New("no record")

// Client talks to an agent's API socket.
type Client struct {
	http *http.Client
}

// Dial returns a client if an agent answers on socket, or an error.
func Dial(socket string) (*Client, error) {
	if _, err := os.Stat(socket); err != nil {
		return nil, err
	}
	c := &Client{http: &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
	}}}
	// A socket file without an agent behind it (a crash) is not an API.
	conn, err := net.Dial("unix", socket)
	if err != nil {
		return nil, err
	}
	conn.Close()
	return c, nil
}

func (c *Client) get(ctx context.Context, path string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://pktmeta"+path, nil)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("agent API: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusNotFound {
		return ErrNotFound
	}
	if resp.StatusCode != http.StatusOK {
		var e apiError
		json.NewDecoder(resp.Body).Decode(&e)
		return fmt.Errorf("agent API %s: %s: %s", path, resp.Status, e.Error)
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

// Conns lists live connections.
func (c *Client) Conns(ctx context.Context) ([]view.Conn, error) {
	var out []view.Conn
	err := c.get(ctx, "/v1/conns", &out)
	return out, err
}

// Lookup finds the record of a tuple.
func (c *Client) Lookup(ctx context.Context, t datapath.Tuple) (view.Conn, error) {
	q := url.Values{"proto": {datapath.ProtoName(t.Proto)}, "src": {t.Src.String()}, "dst": {t.Dst.String()}}
	var out view.Conn
	err := c.get(ctx, "/v1/lookup?"+q.Encode(), &out)
	return out, err
}

// Events streams events until ctx ends or fn returns false.
func (c *Client) Events(ctx context.Context, fn func(view.Event) bool) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://pktmeta/v1/events", nil)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("agent API: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("agent API /v1/events: %s", resp.Status)
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64*1024), 1<<20)
	for sc.Scan() {
		var ev view.Event
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			return fmt.Errorf("agent API event: %w", err)
		}
		if !fn(ev) {
			return nil
		}
	}
	if ctx.Err() != nil {
		return nil
	}
	return sc.Err()
}
