package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// What a SYN leaves free for the 20-byte pktmeta option: Linux's own
// SYNs, in the configurations pods use, captured on loopback in a private
// netns. Every pod shares its node's TCP stack, so these are the clients
// that matter.

const ipprotoMPTCP = 262

type synVariant struct {
	name  string
	setup func() error // sysctls, in the private netns
	proto int          // of the client socket
}

func synSpace(rep *Report) error {
	return inPrivateNetns(func() error {
		if err := setLoUp(); err != nil {
			return err
		}
		variants := []synVariant{
			{name: "Linux default (MSS, SACK, timestamps, window scale)", proto: unix.IPPROTO_TCP},
			{name: "Linux, tcp_timestamps=0", proto: unix.IPPROTO_TCP, setup: func() error { return sysctl("net/ipv4/tcp_timestamps", "0") }},
			{name: "Linux, MPTCP socket", proto: ipprotoMPTCP, setup: func() error {
				if err := sysctl("net/ipv4/tcp_timestamps", "1"); err != nil {
					return err
				}
				return sysctl("net/mptcp/enabled", "1")
			}},
		}
		for _, v := range variants {
			if v.setup != nil {
				if err := v.setup(); err != nil {
					fmt.Fprintf(os.Stderr, "bench: SYN option space, %s: not measured: %v\n", v.name, err)
					continue
				}
			}
			used, err := synOptionBytes(v.proto)
			if errors.Is(err, unix.EPROTONOSUPPORT) || errors.Is(err, unix.ENOPROTOOPT) {
				fmt.Fprintf(os.Stderr, "bench: SYN option space, %s: not measured: %v\n", v.name, err)
				continue
			}
			if err != nil {
				return fmt.Errorf("SYN option space, %s: %w", v.name, err)
			}
			free := float64(40 - used)
			r := summarize("SYN option space: "+v.name, "bytes free", "cross-node", []float64{free})
			r.Note = fmt.Sprintf("%d bytes of options on the SYN; the pktmeta option needs 20", used)
			rep.add(r)
		}
		return nil
	})
}

func sysctl(name, value string) error {
	return os.WriteFile("/proc/sys/"+name, []byte(value), 0o644)
}

func setLoUp() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return err
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	return unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr)
}

// synOptionBytes connects to a listener on 127.0.0.1 with a socket of proto
// and returns the length of the options on the SYN, read with a packet
// socket on lo.
func synOptionBytes(proto int) (int, error) {
	cap, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, int(htons16(unix.ETH_P_IP)))
	if err != nil {
		return 0, err
	}
	defer unix.Close(cap)
	unix.SetsockoptTimeval(cap, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 1})
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	go func() {
		if c, err := l.Accept(); err == nil {
			c.Close()
		}
	}()
	port := l.Addr().(*net.TCPAddr).Port
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, proto)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	sport := 0
	if err := unix.Connect(fd, &unix.SockaddrInet4{Port: port, Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		return 0, err
	}
	if sa, err := unix.Getsockname(fd); err == nil {
		sport = sa.(*unix.SockaddrInet4).Port
	}
	buf := make([]byte, 2048)
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		n, _, err := unix.Recvfrom(cap, buf, 0)
		if errors.Is(err, syscall.EAGAIN) || errors.Is(err, syscall.EINTR) {
			continue
		}
		if err != nil {
			return 0, err
		}
		f := buf[:n]
		if len(f) < 14+20+20 {
			continue
		}
		ip := f[14:]
		if ip[9] != unix.IPPROTO_TCP {
			continue
		}
		th := ip[int(ip[0]&0xf)*4:]
		if int(th[0])<<8|int(th[1]) != sport || th[13]&0x12 != 0x02 {
			continue
		}
		return int(th[12]>>4)*4 - 20, nil
	}
	return 0, errors.New("no SYN captured")
}

func htons16(v uint16) uint16 { return v<<8 | v>>8 }
