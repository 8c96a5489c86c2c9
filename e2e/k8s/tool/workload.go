package main

// The workload subcommands: what ordinary, unprivileged pods of the test
// run. Servers echo, so that a client knows its bytes crossed the path
// both ways; clients report the ip:port pair of each connection as their
// socket sees it, which is the tuple the test then looks up in pktmeta's
// maps.

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pktmeta/pktmeta"
)

func cmdServe(ctx context.Context, e *env, args []string) error {
	flags := flag.NewFlagSet("serve", flag.ContinueOnError)
	tcpAddr := flags.String("tcp", ":8080", `TCP echo listen address ("" for none)`)
	udpAddr := flags.String("udp", ":5353", `UDP echo listen address ("" for none)`)
	if _, err := parseFlags(flags, args, 0); err != nil {
		return err
	}
	if *tcpAddr == "" && *udpAddr == "" {
		return usagef("nothing to serve")
	}
	var lc net.ListenConfig
	errc := make(chan error, 2)
	if *tcpAddr != "" {
		ln, err := lc.Listen(ctx, "tcp", *tcpAddr)
		if err != nil {
			return err
		}
		defer ln.Close()
		context.AfterFunc(ctx, func() { ln.Close() })
		e.out.emit(obj{"event": "listening", "proto": "tcp", "local": addrString(ln.Addr())})
		go func() { errc <- serveTCP(ctx, e, ln) }()
	}
	if *udpAddr != "" {
		pc, err := lc.ListenPacket(ctx, "udp", *udpAddr)
		if err != nil {
			return err
		}
		defer pc.Close()
		context.AfterFunc(ctx, func() { pc.Close() })
		e.out.emit(obj{"event": "listening", "proto": "udp", "local": addrString(pc.LocalAddr())})
		go func() { errc <- serveUDP(ctx, e, pc.(*net.UDPConn)) }()
	}
	select {
	case <-ctx.Done():
		return nil
	case err := <-errc:
		return err
	}
}

// serveTCP echoes every connection until its peer closes it. The
// "closed" event tells the test how a connection ended (a forged RST
// shows up as "connection reset by peer").
func serveTCP(ctx context.Context, e *env, ln net.Listener) error {
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return err
		}
		local, remote := addrString(c.LocalAddr()), addrString(c.RemoteAddr())
		// What an application in the pod learns from its own socket.
		e.out.emit(obj{"event": "accept", "proto": "tcp", "local": local, "remote": remote, "origin": originOf(c)})
		go func() {
			defer c.Close()
			// Closing on cancel matters only in-process (tests): a killed
			// server's connections die with it anyway.
			stop := context.AfterFunc(ctx, func() { c.Close() })
			defer stop()
			n, err := io.Copy(c, c)
			if ctx.Err() != nil {
				return
			}
			e.out.emit(obj{"event": "closed", "proto": "tcp", "local": local, "remote": remote, "bytes": n, "err": errString(err)})
		}()
	}
}

// originOf asks c's socket who opened its connection (pktmeta.Origin).
func originOf(c net.Conn) obj {
	o, err := pktmeta.Origin(c)
	if err != nil {
		return obj{"err": err.Error()}
	}
	return obj{"namespace": o.Namespace, "pod": o.Pod, "uid": o.UID, "tags": o.Tags, "podTags": o.PodTags,
		"nat": o.NAT, "connId": o.ConnID}
}

// serveUDP answers each datagram with its payload. The socket is usually
// bound to the wildcard address, so the local address of a datagram comes
// from IP_PKTINFO / IPV6_PKTINFO: the address the client actually reached
// (after any service DNAT). The reply goes out with the kernel's choice of
// source, which in a pod with one address is that same address. Before
// the reply, the socket is asked who opened the flow of the datagram it
// just returned (an unconnected socket bound to the wildcard: pktmeta's
// recvmsg programs remembered the source).
func serveUDP(ctx context.Context, e *env, c *net.UDPConn) error {
	enablePktinfo(c)
	port := uint16(0)
	if ua, ok := c.LocalAddr().(*net.UDPAddr); ok {
		port = uint16(ua.Port)
	}
	buf := make([]byte, 65536)
	oob := make([]byte, 512)
	for {
		n, oobn, _, from, err := c.ReadMsgUDPAddrPort(buf, oob)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		origin := originOf(c)
		local := addrString(c.LocalAddr())
		if dst, ok := pktinfoDst(oob[:oobn]); ok {
			local = netip.AddrPortFrom(dst, port).String()
		}
		if _, err := c.WriteToUDPAddrPort(buf[:n], from); err != nil {
			e.out.emit(obj{"event": "error", "proto": "udp", "local": local, "remote": unmapped(from), "err": errString(err)})
			continue
		}
		e.out.emit(obj{"event": "datagram", "proto": "udp", "local": local, "remote": unmapped(from), "origin": origin})
	}
}

// enablePktinfo asks for the destination address of each datagram. Both
// options are set because a dual-stack socket receives IPv4 datagrams
// with IP_PKTINFO and IPv6 ones with IPV6_PKTINFO; failures only cost the
// precise local address.
func enablePktinfo(c *net.UDPConn) {
	rc, err := c.SyscallConn()
	if err != nil {
		return
	}
	_ = rc.Control(func(fd uintptr) {
		_ = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_PKTINFO, 1)
		_ = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_RECVPKTINFO, 1)
	})
}

// pktinfoDst finds the datagram's destination address in its control
// messages.
func pktinfoDst(oob []byte) (netip.Addr, bool) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return netip.Addr{}, false
	}
	for _, m := range msgs {
		switch {
		case m.Header.Level == unix.IPPROTO_IP && m.Header.Type == unix.IP_PKTINFO && len(m.Data) >= unix.SizeofInet4Pktinfo:
			// struct in_pktinfo { int ifindex; in_addr spec_dst; in_addr addr; }:
			// addr is the header's destination.
			return netip.AddrFrom4([4]byte(m.Data[8:12])), true
		case m.Header.Level == unix.IPPROTO_IPV6 && m.Header.Type == unix.IPV6_PKTINFO && len(m.Data) >= unix.SizeofInet6Pktinfo:
			return netip.AddrFrom16([16]byte(m.Data[:16])).Unmap(), true
		}
	}
	return netip.Addr{}, false
}

// cmdDial opens a new connection every interval and keeps all of them:
// held connections are what a CNI upgrade or an agent restart must not
// disturb, and each has its own tuple for the test to look up. n is the
// attempt number; --count counts connections held, so a transient failure
// (DNS not ready yet) does not leave the test with fewer than it asked for.
func cmdDial(ctx context.Context, e *env, args []string) error {
	flags := flag.NewFlagSet("dial", flag.ContinueOnError)
	addr := flags.String("tcp", "", "HOST:PORT of a TCP echo server")
	every := flags.Duration("every", time.Second, "interval between new connections")
	count := flags.Int("count", 0, "connections to hold, then idle (0: keep adding forever)")
	timeout := flags.Duration("timeout", 5*time.Second, "limit of each dial and round trip")
	if _, err := parseFlags(flags, args, 0); err != nil {
		return err
	}
	if *addr == "" {
		return usagef("--tcp is required")
	}
	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	d := net.Dialer{Timeout: *timeout}
	for n := 1; ; n++ {
		if *count > 0 && len(held) >= *count {
			<-ctx.Done()
			return nil
		}
		c, err := d.DialContext(ctx, "tcp", *addr)
		if err == nil {
			err = roundTrip(c, []byte("ping\n"), *timeout)
			if err != nil {
				c.Close()
			}
		}
		if ctx.Err() != nil {
			return nil
		}
		if err != nil {
			e.out.emit(obj{"event": "error", "n": n, "err": errString(err)})
		} else {
			held = append(held, c)
			local, remote := addrString(c.LocalAddr()), addrString(c.RemoteAddr())
			e.out.emit(obj{"event": "connected", "n": n, "held": len(held), "local": local, "remote": remote})
			go watchHeld(ctx, e, c, n, local, remote)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(*every):
		}
	}
}

// watchHeld reports a held connection that ends: the server never sends
// unprompted, so anything a read returns means the connection is gone.
func watchHeld(ctx context.Context, e *env, c net.Conn, n int, local, remote string) {
	var b [1]byte
	_, err := c.Read(b[:])
	if ctx.Err() != nil {
		return
	}
	if err == nil {
		err = errors.New("unexpected data from the server")
	}
	e.out.emit(obj{"event": "lost", "n": n, "local": local, "remote": remote, "err": errString(err)})
}

// roundTrip writes msg and reads it back within timeout.
func roundTrip(c net.Conn, msg []byte, timeout time.Duration) error {
	if err := c.SetDeadline(time.Now().Add(timeout)); err != nil {
		return err
	}
	if _, err := c.Write(msg); err != nil {
		return err
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		return err
	}
	if !bytes.Equal(got, msg) {
		return fmt.Errorf("echo mismatch: sent %q, got %q", msg, got)
	}
	return c.SetDeadline(time.Time{})
}

// cmdStream keeps one connection busy. It never reconnects: the point is
// to show that this very connection survives (or not) whatever the test
// does to the node meanwhile.
func cmdStream(ctx context.Context, e *env, args []string) error {
	flags := flag.NewFlagSet("stream", flag.ContinueOnError)
	addr := flags.String("tcp", "", "HOST:PORT of a TCP echo server")
	interval := flags.Duration("interval", 100*time.Millisecond, "interval between round trips")
	timeout := flags.Duration("timeout", 5*time.Second, "limit of the dial and of each round trip")
	if _, err := parseFlags(flags, args, 0); err != nil {
		return err
	}
	if *addr == "" {
		return usagef("--tcp is required")
	}
	var total int64
	fail := func(err error) error {
		if ctx.Err() != nil {
			return nil
		}
		e.out.emit(obj{"event": "error", "err": errString(err), "bytes": total})
		return err
	}
	d := net.Dialer{Timeout: *timeout}
	c, err := d.DialContext(ctx, "tcp", *addr)
	if err != nil {
		return fail(err)
	}
	defer c.Close()
	context.AfterFunc(ctx, func() { c.Close() })
	e.out.emit(obj{"event": "connected", "local": addrString(c.LocalAddr()), "remote": addrString(c.RemoteAddr())})
	tick := time.NewTicker(*interval)
	defer tick.Stop()
	progress := time.NewTicker(time.Second)
	defer progress.Stop()
	for rounds := 1; ; {
		select {
		case <-ctx.Done():
			return nil
		case <-progress.C:
			e.out.emit(obj{"event": "progress", "bytes": total, "rounds": rounds - 1})
		case <-tick.C:
			line := []byte(fmt.Sprintf("round %d\n", rounds))
			if err := roundTrip(c, line, *timeout); err != nil {
				return fail(fmt.Errorf("round %d: %w", rounds, err))
			}
			total += int64(len(line))
			rounds++
		}
	}
}

// cmdUDP sends every query from one socket, so all of them share one
// tuple, the way a DNS client's retries or a QUIC flow do. The socket is
// connected: the kernel then drops replies from any other address, and
// reports an ICMP port unreachable as an error.
func cmdUDP(ctx context.Context, e *env, args []string) error {
	flags := flag.NewFlagSet("udp", flag.ContinueOnError)
	addr := flags.String("addr", "", "HOST:PORT of a UDP echo server")
	count := flags.Int("count", 1, "datagrams to send")
	every := flags.Duration("every", time.Second, "interval between datagrams")
	timeout := flags.Duration("timeout", 3*time.Second, "wait for each echo")
	hold := flags.Duration("hold", 0, "keep the socket open this long after the last datagram (negative: until killed)")
	if _, err := parseFlags(flags, args, 0); err != nil {
		return err
	}
	if *addr == "" {
		return usagef("--addr is required")
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "udp", *addr)
	if err != nil {
		return err
	}
	defer c.Close()
	context.AfterFunc(ctx, func() { c.Close() })
	local, remote := addrString(c.LocalAddr()), addrString(c.RemoteAddr())
	failed := 0
	for n := 1; n <= *count; n++ {
		err := udpQuery(c, []byte(fmt.Sprintf("query %d", n)), *timeout)
		if ctx.Err() != nil {
			return nil
		}
		if err != nil {
			failed++
			e.out.emit(obj{"event": "error", "n": n, "local": local, "remote": remote, "err": errString(err)})
		} else {
			e.out.emit(obj{"event": "answered", "n": n, "local": local, "remote": remote})
		}
		if n < *count && sleepCtx(ctx, *every) != nil {
			return nil
		}
	}
	switch {
	case *hold < 0:
		<-ctx.Done()
		return nil
	case *hold > 0:
		if sleepCtx(ctx, *hold) != nil {
			return nil
		}
	}
	if failed > 0 {
		return fmt.Errorf("%d of %d queries unanswered", failed, *count)
	}
	return nil
}

// udpQuery sends q and waits for its echo, skipping late echoes of
// earlier queries that timed out.
func udpQuery(c net.Conn, q []byte, timeout time.Duration) error {
	if err := c.SetDeadline(time.Now().Add(timeout)); err != nil {
		return err
	}
	if _, err := c.Write(q); err != nil {
		return err
	}
	buf := make([]byte, 65536)
	for {
		n, err := c.Read(buf)
		if err != nil {
			return err
		}
		if bytes.Equal(buf[:n], q) {
			return nil
		}
	}
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// cmdHTTPGet always exits 0: a refused or failed request is a result the
// test asserts on (a pod must not read the node's metrics), not a failure
// of the tool. ok means a 2xx response.
func cmdHTTPGet(ctx context.Context, e *env, args []string) error {
	flags := flag.NewFlagSet("http-get", flag.ContinueOnError)
	timeout := flags.Duration("timeout", 3*time.Second, "limit of the whole request")
	insecure := flags.Bool("insecure", false, "do not verify the server's TLS certificate (so a refusal is the server's, not ours)")
	tokenFile := flags.String("token-file", "", "send the file's content as a bearer token (e.g. the pod's service account token)")
	// A whole /metrics page: the line a test looks for may be anywhere in it.
	maxBody := flags.Int64("max-body", 4<<20, "keep at most this many bytes of the body (the rest is read and dropped; truncated says so)")
	pos, err := parseFlags(flags, args, 1)
	if err != nil {
		return err
	}
	url := pos[0]
	res := obj{"event": "http", "url": url, "ok": false, "status": 0, "err": "", "body": ""}
	defer func() { e.out.emit(res) }()
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.Proxy = nil
	if *insecure {
		tr.TLSClientConfig = &tls.Config{InsecureSkipVerify: true}
	}
	client := &http.Client{Timeout: *timeout, Transport: tr}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		res["err"] = errString(err)
		return nil
	}
	if *tokenFile != "" {
		tok, err := os.ReadFile(*tokenFile)
		if err != nil {
			res["err"] = errString(err)
			return nil
		}
		req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(tok)))
	}
	resp, err := client.Do(req)
	if err != nil {
		res["err"] = errString(err)
		return nil
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, *maxBody))
	if err == nil {
		var rest int64
		rest, err = io.Copy(io.Discard, resp.Body)
		res["truncated"] = rest > 0
	}
	res["status"] = resp.StatusCode
	res["body"] = string(body)
	res["err"] = errString(err)
	res["ok"] = err == nil && resp.StatusCode >= 200 && resp.StatusCode < 300
	return nil
}

// cmdSleep only waits to be killed: a pod to exec into.
func cmdSleep(ctx context.Context, _ *env, args []string) error {
	flags := flag.NewFlagSet("sleep", flag.ContinueOnError)
	if _, err := parseFlags(flags, args, 0); err != nil {
		return err
	}
	<-ctx.Done()
	return nil
}
