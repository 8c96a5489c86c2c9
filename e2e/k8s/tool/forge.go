package main

// forge sends TCP segments that claim to come from somewhere else: the
// test uses them to check that pktmeta's source validation does not
// believe a pod about its own address, and that a forged RST or FIN does
// not end bookkeeping for someone else's connection. A raw socket with
// IP_HDRINCL (implied by IPPROTO_RAW) lets us write the whole IPv4 header,
// source included; it needs only CAP_NET_RAW, which pods have by default.

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"flag"
	"fmt"
	"net/netip"

	"golang.org/x/sys/unix"
)

// TCP flags.
const (
	tcpFIN = 0x01
	tcpSYN = 0x02
	tcpRST = 0x04
	tcpACK = 0x10
)

var forgeKinds = map[string]uint8{
	"syn": tcpSYN,
	// RST alone (no ACK), as sent in answer to a segment that had no ACK
	// and as most RST injection does.
	"rst": tcpRST,
	// FIN|ACK, how every real stack sends a FIN.
	"fin": tcpFIN | tcpACK,
}

// segment is one forged packet.
type segment struct {
	src, dst netip.AddrPort
	seq, ack uint32
	flags    uint8
	id       uint16 // IPv4 identification
}

// bytes is the IPv4 packet: a 20-byte IPv4 header (TTL 64, DF) and a
// 20-byte TCP header (no options, window 65535), no payload, both
// checksums filled in. The kernel would fill the IPv4 checksum itself
// under IP_HDRINCL; we compute it anyway so the unit test can check the
// builder on its own.
func (s segment) bytes() []byte {
	b := make([]byte, 40)
	ip, tcp := b[:20], b[20:]
	ip[0] = 0x45 // version 4, IHL 5 words
	binary.BigEndian.PutUint16(ip[2:], uint16(len(b)))
	binary.BigEndian.PutUint16(ip[4:], s.id)
	binary.BigEndian.PutUint16(ip[6:], 0x4000) // DF, fragment offset 0
	ip[8] = 64                                 // TTL
	ip[9] = unix.IPPROTO_TCP
	src, dst := s.src.Addr().As4(), s.dst.Addr().As4()
	copy(ip[12:16], src[:])
	copy(ip[16:20], dst[:])
	binary.BigEndian.PutUint16(ip[10:], checksum(0, ip))

	binary.BigEndian.PutUint16(tcp[0:], s.src.Port())
	binary.BigEndian.PutUint16(tcp[2:], s.dst.Port())
	binary.BigEndian.PutUint32(tcp[4:], s.seq)
	binary.BigEndian.PutUint32(tcp[8:], s.ack)
	tcp[12] = 5 << 4 // data offset 5 words
	tcp[13] = s.flags
	binary.BigEndian.PutUint16(tcp[14:], 65535)
	binary.BigEndian.PutUint16(tcp[16:], checksum(pseudoHeaderSum(src, dst, unix.IPPROTO_TCP, len(tcp)), tcp))
	return b
}

// pseudoHeaderSum is the partial sum of the IPv4 pseudo-header that the
// TCP and UDP checksums cover.
func pseudoHeaderSum(src, dst [4]byte, proto uint8, length int) uint32 {
	var sum uint32
	for _, a := range [][4]byte{src, dst} {
		sum += uint32(binary.BigEndian.Uint16(a[0:])) + uint32(binary.BigEndian.Uint16(a[2:]))
	}
	return sum + uint32(proto) + uint32(length)
}

// checksum is the Internet checksum (RFC 1071) of b, starting from the
// partial sum initial. Over data that contains its own correct checksum
// it gives 0.
func checksum(initial uint32, b []byte) uint16 {
	sum := initial
	for ; len(b) >= 2; b = b[2:] {
		sum += uint32(binary.BigEndian.Uint16(b))
	}
	if len(b) == 1 {
		sum += uint32(b[0]) << 8
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

func cmdForge(_ context.Context, e *env, args []string) error {
	flags := flag.NewFlagSet("forge", flag.ContinueOnError)
	srcS := flags.String("src", "", "source IPv4:PORT to claim")
	dstS := flags.String("dst", "", "destination IPv4:PORT")
	kind := flags.String("kind", "", "syn, rst or fin")
	seqFlag := flags.Int64("seq", -1, "sequence number (default random)")
	ackFlag := flags.Uint("ack", 0, "acknowledgment number (for fin, which carries ACK)")
	count := flags.Int("count", 1, "packets to send, all with the same sequence number")
	if _, err := parseFlags(flags, args, 0); err != nil {
		return err
	}
	s, err := forgeSegment(*srcS, *dstS, *kind, *seqFlag, *ackFlag)
	if err != nil {
		return err
	}
	if *count < 1 {
		return usagef("--count must be at least 1")
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
	if err != nil {
		return fmt.Errorf("raw socket (needs CAP_NET_RAW): %w", err)
	}
	defer unix.Close(fd)
	to := &unix.SockaddrInet4{Addr: s.dst.Addr().As4()}
	for i := 0; i < *count; i++ {
		s.id = randUint16()
		if err := unix.Sendto(fd, s.bytes(), 0, to); err != nil {
			return fmt.Errorf("send: %w", err)
		}
		e.out.emit(obj{"event": "forged", "kind": *kind, "src": s.src.String(), "dst": s.dst.String(), "seq": s.seq, "ack": s.ack})
	}
	return nil
}

// forgeSegment checks forge's flags and makes the segment.
func forgeSegment(srcS, dstS, kind string, seq int64, ack uint) (segment, error) {
	var s segment
	var err error
	if s.src, err = netip.ParseAddrPort(srcS); err != nil || !s.src.Addr().Unmap().Is4() {
		return s, usagef("--src %q: want IPv4:PORT", srcS)
	}
	if s.dst, err = netip.ParseAddrPort(dstS); err != nil || !s.dst.Addr().Unmap().Is4() {
		return s, usagef("--dst %q: want IPv4:PORT", dstS)
	}
	s.src = netip.AddrPortFrom(s.src.Addr().Unmap(), s.src.Port())
	s.dst = netip.AddrPortFrom(s.dst.Addr().Unmap(), s.dst.Port())
	var ok bool
	if s.flags, ok = forgeKinds[kind]; !ok {
		return s, usagef("--kind %q: want syn, rst or fin", kind)
	}
	switch {
	case seq < 0:
		s.seq = randUint32()
	case seq > 1<<32-1:
		return s, usagef("--seq %d out of range", seq)
	default:
		s.seq = uint32(seq)
	}
	if ack > 1<<32-1 {
		return s, usagef("--ack %d out of range", ack)
	}
	s.ack = uint32(ack)
	return s, nil
}

func randUint32() uint32 {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return binary.BigEndian.Uint32(b[:])
}

func randUint16() uint16 { return uint16(randUint32()) }
