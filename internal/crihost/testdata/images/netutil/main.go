// Command netutil is the one binary of the crihost "netutil" test image:
//
//	netutil serve [--tcp :8080] [--udp :8081]
//	netutil connect (--tcp | --udp) HOST:PORT [--payload ping] [--timeout 5s] [--hold 30s]
//
// serve runs TCP and UDP echo servers and prints one JSON line per TCP
// connection and per UDP datagram: {"event":"accept"|"datagram","proto",
// "local","remote"}. connect does one echo round trip, prints
// {"event":"connected","proto","local","remote"} and, with --hold, keeps
// the socket open that long (so the connection is still live when a test
// looks at it). Output is line-buffered JSON on stdout, which containerd
// writes to the container log.
//
// It lives under testdata so `go build ./...` of the repository skips it;
// crihost builds it as a static binary in a temp dir. Standard library
// only, so that build needs no modules.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(os.Args[2:])
	case "connect":
		err = connect(os.Args[2:])
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "netutil:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: netutil serve [--tcp ADDR] [--udp ADDR] | connect (--tcp|--udp) HOST:PORT [--payload S] [--timeout D] [--hold D]")
	os.Exit(2)
}

type line struct {
	Event  string `json:"event"`
	Proto  string `json:"proto"`
	Local  string `json:"local"`
	Remote string `json:"remote"`
	Error  string `json:"error,omitempty"`
}

func emit(l line) {
	b, _ := json.Marshal(l)
	os.Stdout.Write(append(b, '\n'))
}

func serve(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ExitOnError)
	tcpAddr := fs.String("tcp", "", "TCP echo listen address")
	udpAddr := fs.String("udp", "", "UDP echo listen address")
	fs.Parse(args)
	if *tcpAddr == "" && *udpAddr == "" {
		return errors.New("serve: need --tcp and/or --udp")
	}
	errs := make(chan error, 2)
	if *tcpAddr != "" {
		l, err := net.Listen("tcp", *tcpAddr)
		if err != nil {
			return err
		}
		go func() { errs <- serveTCP(l) }()
	}
	if *udpAddr != "" {
		c, err := net.ListenPacket("udp", *udpAddr)
		if err != nil {
			return err
		}
		go func() { errs <- serveUDP(c) }()
	}
	emit(line{Event: "listening", Proto: "tcp+udp", Local: *tcpAddr + " " + *udpAddr})
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	select {
	case <-sigs:
		return nil
	case err := <-errs:
		return err
	}
}

func serveTCP(l net.Listener) error {
	for {
		c, err := l.Accept()
		if err != nil {
			return err
		}
		emit(line{Event: "accept", Proto: "tcp", Local: c.LocalAddr().String(), Remote: c.RemoteAddr().String()})
		go func() {
			defer c.Close()
			io.Copy(c, c)
		}()
	}
}

func serveUDP(c net.PacketConn) error {
	buf := make([]byte, 64<<10)
	for {
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			return err
		}
		emit(line{Event: "datagram", Proto: "udp", Local: c.LocalAddr().String(), Remote: from.String()})
		if _, err := c.WriteTo(buf[:n], from); err != nil {
			return err
		}
	}
}

func connect(args []string) error {
	fs := flag.NewFlagSet("connect", flag.ExitOnError)
	tcpAddr := fs.String("tcp", "", "TCP echo server HOST:PORT")
	udpAddr := fs.String("udp", "", "UDP echo server HOST:PORT")
	payload := fs.String("payload", "ping", "what to send")
	timeout := fs.Duration("timeout", 5*time.Second, "dial and round-trip timeout")
	hold := fs.Duration("hold", 0, "keep the connection open this long after the round trip")
	fs.Parse(args)
	proto, addr := "tcp", *tcpAddr
	if *udpAddr != "" {
		proto, addr = "udp", *udpAddr
	}
	if (*tcpAddr == "") == (*udpAddr == "") {
		return errors.New("connect: need exactly one of --tcp and --udp")
	}
	c, err := net.DialTimeout(proto, addr, *timeout)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(*timeout))
	if _, err := c.Write([]byte(*payload)); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	got := make([]byte, len(*payload))
	if _, err := io.ReadFull(c, got); err != nil {
		return fmt.Errorf("read echo: %w", err)
	}
	if !bytes.Equal(got, []byte(*payload)) {
		return fmt.Errorf("echo mismatch: sent %q, got %q", *payload, got)
	}
	emit(line{Event: "connected", Proto: proto, Local: c.LocalAddr().String(), Remote: c.RemoteAddr().String()})
	if *hold > 0 {
		sigs := make(chan os.Signal, 1)
		signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
		select {
		case <-time.After(*hold):
		case <-sigs:
		}
	}
	return nil
}
