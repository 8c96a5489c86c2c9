package testutil

import (
	"encoding/binary"
	"net"
	"net/netip"
)

// TCP flags for Packet.TCPFlags.
const (
	FIN = 0x01
	SYN = 0x02
	RST = 0x04
	PSH = 0x08
	ACK = 0x10
)

// Packet describes a test packet; Bytes renders it with correct IPv4 and
// TCP/UDP checksums, so that a real stack and conntrack accept it too.
type Packet struct {
	Src, Dst netip.AddrPort
	Proto    uint8 // 6 or 17
	TCPFlags uint8
	Seq      uint32
	Ack      uint32
	// SrcMAC and DstMAC fill the Ethernet header; zero: fixed test MACs.
	SrcMAC, DstMAC net.HardwareAddr
	// IPv4Options are appended to the IPv4 header (padded to 4 bytes).
	IPv4Options []byte
	// FragOffset (in 8-byte units) and MoreFragments set IPv4 fragmentation,
	// or add an IPv6 fragment header.
	FragOffset    uint16
	MoreFragments bool
	// IPv6Ext lists extension headers (0 hop-by-hop, 43 routing,
	// 60 destination options) put before the L4 header, 8 bytes each.
	IPv6Ext []uint8
	// TCPOptions follow the TCP header (padded with NOPs to 4 bytes).
	TCPOptions []byte
	Payload    []byte
}

// Bytes renders Ethernet + IP + L4.
func (p Packet) Bytes() []byte {
	l4 := p.l4()
	var out []byte
	eth := make([]byte, 14)
	copy(eth[0:6], []byte{2, 0, 0, 0, 0, 2})
	copy(eth[6:12], []byte{2, 0, 0, 0, 0, 1})
	if len(p.DstMAC) == 6 {
		copy(eth[0:6], p.DstMAC)
	}
	if len(p.SrcMAC) == 6 {
		copy(eth[6:12], p.SrcMAC)
	}
	p.l4Checksum(l4)
	if p.Src.Addr().Is4() {
		binary.BigEndian.PutUint16(eth[12:], 0x0800)
		out = append(eth, p.ipv4(len(l4))...)
	} else {
		binary.BigEndian.PutUint16(eth[12:], 0x86dd)
		out = append(eth, p.ipv6(l4)...)
		return out
	}
	return append(out, l4...)
}

// l4Checksum fills the TCP or UDP checksum over the pseudo-header (the
// addresses as they are written: IPv4, or IPv6 as given).
func (p Packet) l4Checksum(l4 []byte) {
	var pseudo []byte
	if p.Src.Addr().Is4() {
		s, d := p.Src.Addr().As4(), p.Dst.Addr().As4()
		pseudo = append(append(pseudo, s[:]...), d[:]...)
		pseudo = append(pseudo, 0, p.Proto, byte(len(l4)>>8), byte(len(l4)))
	} else {
		s, d := p.Src.Addr().As16(), p.Dst.Addr().As16()
		pseudo = append(append(pseudo, s[:]...), d[:]...)
		pseudo = binary.BigEndian.AppendUint32(pseudo, uint32(len(l4)))
		pseudo = append(pseudo, 0, 0, 0, p.Proto)
	}
	off := 16 // TCP
	if p.Proto == 17 {
		off = 6
	}
	if len(l4) < off+2 {
		return
	}
	l4[off], l4[off+1] = 0, 0
	sum := checksum(append(pseudo, l4...))
	if sum == 0 && p.Proto == 17 {
		sum = 0xffff
	}
	binary.BigEndian.PutUint16(l4[off:], sum)
}

// Checksum is the Internet checksum (RFC 1071).
func Checksum(b []byte) uint16 { return checksum(b) }

// LinuxSYNOptions are the options Linux puts on a SYN by default (MSS
// 1460, SACK permitted, timestamps, window scale 7): 20 bytes, leaving 20.
var LinuxSYNOptions = []byte{2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7}

// checksum is the Internet checksum (RFC 1071).
func checksum(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s > 0xffff {
		s = s>>16 + s&0xffff
	}
	return ^uint16(s)
}

func (p Packet) l4() []byte {
	var h []byte
	if p.Proto == 6 {
		opts := append([]byte(nil), p.TCPOptions...)
		for len(opts)%4 != 0 {
			opts = append(opts, 1) // NOP
		}
		h = make([]byte, 20, 20+len(opts))
		binary.BigEndian.PutUint32(h[4:], p.Seq)
		binary.BigEndian.PutUint32(h[8:], p.Ack)
		h[12] = byte(5+len(opts)/4) << 4
		h[13] = p.TCPFlags
		binary.BigEndian.PutUint16(h[14:], 65535)
		h = append(h, opts...)
	} else {
		h = make([]byte, 8)
		binary.BigEndian.PutUint16(h[4:], uint16(8+len(p.Payload)))
	}
	binary.BigEndian.PutUint16(h[0:], p.Src.Port())
	binary.BigEndian.PutUint16(h[2:], p.Dst.Port())
	return append(h, p.Payload...)
}

func (p Packet) ipv4(l4len int) []byte {
	opts := append([]byte(nil), p.IPv4Options...)
	for len(opts)%4 != 0 {
		opts = append(opts, 0) // end-of-options padding
	}
	ihl := 5 + len(opts)/4
	h := make([]byte, 20)
	h[0] = 0x40 | byte(ihl)
	binary.BigEndian.PutUint16(h[2:], uint16(ihl*4+l4len))
	frag := p.FragOffset & 0x1fff
	if p.MoreFragments {
		frag |= 0x2000
	}
	binary.BigEndian.PutUint16(h[6:], frag)
	h[8] = 64
	h[9] = p.Proto
	s, d := p.Src.Addr().As4(), p.Dst.Addr().As4()
	copy(h[12:], s[:])
	copy(h[16:], d[:])
	h = append(h, opts...)
	binary.BigEndian.PutUint16(h[10:], checksum(h))
	return h
}

func (p Packet) ipv6(l4 []byte) []byte {
	var ext []byte
	chain := append([]uint8(nil), p.IPv6Ext...)
	if p.FragOffset != 0 || p.MoreFragments {
		chain = append(chain, 44)
	}
	next := p.Proto
	// Build from the innermost header outwards.
	for i := len(chain) - 1; i >= 0; i-- {
		h := make([]byte, 8)
		h[0] = next
		if chain[i] == 44 {
			off := p.FragOffset << 3
			if p.MoreFragments {
				off |= 1
			}
			binary.BigEndian.PutUint16(h[2:], off)
			binary.BigEndian.PutUint32(h[4:], 0xabcd)
		} else {
			h[2], h[3] = 1, 4 // a PadN option filling the rest
		}
		ext = append(h, ext...)
		next = chain[i]
	}
	h := make([]byte, 40)
	h[0] = 0x60
	binary.BigEndian.PutUint16(h[4:], uint16(len(ext)+len(l4)))
	h[6] = next
	h[7] = 64
	s, d := p.Src.Addr().As16(), p.Dst.Addr().As16()
	copy(h[8:], s[:])
	copy(h[24:], d[:])
	out := append(h, ext...)
	return append(out, l4...)
}
