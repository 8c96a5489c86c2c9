package testbed

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"time"
)

// Do runs fn on a locked OS thread in the pod's network namespace, with the
// same caveats as Node.Do.
func (p *Pod) Do(fn func() error) error {
	return inNetns(p.NetnsPath, fn)
}

// Run runs a program in the pod's network namespace and returns its stdout.
func (p *Pod) Run(ctx context.Context, name string, args ...string) ([]byte, error) {
	return runIn(ctx, p.NetnsPath, nil, name, args...)
}

// A socket belongs to the namespace it was created in for its whole life,
// so the helpers below only create it inside the pod namespace; the returned
// socket can then be used from any goroutine. They are closed by Node.Close
// if the caller has not done so.

// ListenTCP listens on port on all the pod's addresses, IPv4 and IPv6.
func (p *Pod) ListenTCP(port int) (net.Listener, error) {
	var l net.Listener
	err := p.Do(func() error {
		var err error
		l, err = net.ListenTCP("tcp", &net.TCPAddr{Port: port})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("pod %s: listen tcp %d: %w", p.Spec.Name, port, err)
	}
	p.node.track(l)
	return l, nil
}

// ListenUDP binds port on all the pod's addresses, IPv4 and IPv6.
func (p *Pod) ListenUDP(port int) (*net.UDPConn, error) {
	var c *net.UDPConn
	err := p.Do(func() error {
		var err error
		c, err = net.ListenUDP("udp", &net.UDPAddr{Port: port})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("pod %s: listen udp %d: %w", p.Spec.Name, port, err)
	}
	p.node.track(c)
	return c, nil
}

// DialTCP connects from the pod to addr.
func (p *Pod) DialTCP(ctx context.Context, addr netip.AddrPort) (net.Conn, error) {
	var c net.Conn
	err := p.Do(func() error {
		var err error
		var d net.Dialer
		c, err = d.DialContext(ctx, "tcp", addr.String())
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("pod %s: dial tcp %s: %w", p.Spec.Name, addr, err)
	}
	p.node.track(c)
	return c, nil
}

// DialUDP returns a UDP socket in the pod connected to addr.
func (p *Pod) DialUDP(addr netip.AddrPort) (*net.UDPConn, error) {
	var c *net.UDPConn
	err := p.Do(func() error {
		var err error
		c, err = net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(addr))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("pod %s: dial udp %s: %w", p.Spec.Name, addr, err)
	}
	p.node.track(c)
	return c, nil
}

// EchoServer echoes back what it receives until closed.
type EchoServer struct {
	closer io.Closer
	wg     sync.WaitGroup
	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	closed bool
}

// ServeTCPEcho serves every connection accepted on l by echoing its bytes
// back, until the returned server is closed (which closes l and the
// connections).
func ServeTCPEcho(l net.Listener) *EchoServer {
	e := &EchoServer{closer: l, conns: make(map[net.Conn]struct{})}
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			if !e.add(c) {
				return
			}
			e.wg.Add(1)
			go func() {
				defer e.wg.Done()
				defer e.remove(c)
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	return e
}

// ServeUDPEcho sends every datagram received on c back to its sender, until
// the returned server is closed (which closes c). Replies to a client that
// reached c through a DNATed VIP leave from c's address and are un-DNATed
// by conntrack, as with a real service.
func ServeUDPEcho(c net.PacketConn) *EchoServer {
	e := &EchoServer{closer: c}
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		buf := make([]byte, 64<<10)
		for {
			n, from, err := c.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = c.WriteTo(buf[:n], from)
		}
	}()
	return e
}

func (e *EchoServer) add(c net.Conn) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		c.Close()
		return false
	}
	e.conns[c] = struct{}{}
	return true
}

func (e *EchoServer) remove(c net.Conn) {
	e.mu.Lock()
	defer e.mu.Unlock()
	c.Close()
	delete(e.conns, c)
}

// Close stops the server, closes its socket and connections, and waits for
// its goroutines.
func (e *EchoServer) Close() error {
	e.mu.Lock()
	e.closed = true
	for c := range e.conns {
		c.Close()
	}
	e.mu.Unlock()
	err := e.closer.Close()
	e.wg.Wait()
	if errors.Is(err, net.ErrClosed) {
		err = nil
	}
	return err
}

// EchoRoundTrip writes payload to c and reads it back, failing if the echo
// does not arrive within timeout or differs. It works for TCP connections
// and for connected UDP sockets (one datagram each way).
func EchoRoundTrip(c net.Conn, payload []byte, timeout time.Duration) error {
	if err := c.SetDeadline(time.Now().Add(timeout)); err != nil {
		return fmt.Errorf("echo: %w", err)
	}
	defer c.SetDeadline(time.Time{})
	if _, err := c.Write(payload); err != nil {
		return fmt.Errorf("echo %s->%s: write: %w", c.LocalAddr(), c.RemoteAddr(), err)
	}
	got := make([]byte, len(payload))
	if _, ok := c.(net.PacketConn); ok {
		got = make([]byte, len(payload)+1) // room to notice a longer datagram
		n, err := c.Read(got)
		if err != nil {
			return fmt.Errorf("echo %s->%s: read: %w", c.LocalAddr(), c.RemoteAddr(), err)
		}
		got = got[:n]
	} else if _, err := io.ReadFull(c, got); err != nil {
		return fmt.Errorf("echo %s->%s: read: %w", c.LocalAddr(), c.RemoteAddr(), err)
	}
	if !bytes.Equal(got, payload) {
		return fmt.Errorf("echo %s->%s: got %q, want %q", c.LocalAddr(), c.RemoteAddr(), got, payload)
	}
	return nil
}
