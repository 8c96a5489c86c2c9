package datapath

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
)

// The pktmeta TCP option (bpf/datapath.h): what the uplink programs put on
// a SYN leaving for another node and take off one arriving. Userspace
// needs it only to test the datapath and to explain what it sees.
const (
	OptionKind    = 253 // RFC 6994 experimental
	OptionLen     = 20
	OptionExID    = 0x706d // "pm"
	OptionVersion = 1
)

// Option is the decoded pktmeta TCP option.
type Option struct {
	Version  uint8
	ConnID   uint64 // the origin node's conn id, low 44 bits
	Node     uint16
	Workload uint32
	MAC      uint32
}

// Encode renders the option; Seal fills the MAC first if there is a key.
func (o Option) Encode() []byte {
	b := make([]byte, OptionLen)
	b[0], b[1] = OptionKind, OptionLen
	binary.BigEndian.PutUint16(b[2:], OptionExID)
	v := uint64(o.Version)<<connOriginBits | o.ConnID&ConnOriginMask
	binary.BigEndian.PutUint16(b[4:], uint16(v>>32))
	binary.BigEndian.PutUint32(b[6:], uint32(v))
	binary.BigEndian.PutUint16(b[10:], o.Node)
	binary.BigEndian.PutUint32(b[12:], o.Workload)
	binary.BigEndian.PutUint32(b[16:], o.MAC)
	return b
}

// DecodeOption parses one option (kind, length, ExID first).
func DecodeOption(b []byte) (Option, error) {
	if len(b) < OptionLen || b[0] != OptionKind || b[1] != OptionLen || binary.BigEndian.Uint16(b[2:]) != OptionExID {
		return Option{}, errors.New("not a pktmeta option")
	}
	v := uint64(binary.BigEndian.Uint16(b[4:]))<<32 | uint64(binary.BigEndian.Uint32(b[6:]))
	return Option{
		Version:  uint8(v >> connOriginBits),
		ConnID:   v & ConnOriginMask,
		Node:     binary.BigEndian.Uint16(b[10:]),
		Workload: binary.BigEndian.Uint32(b[12:]),
		MAC:      binary.BigEndian.Uint32(b[16:]),
	}, nil
}

// FindOption returns the pktmeta options among TCP options, walked as the
// datapath walks them.
func FindOption(opts []byte) []Option {
	var out []Option
	for i := 0; i < len(opts); {
		switch opts[i] {
		case 0:
			return out
		case 1:
			i++
			continue
		}
		if i+1 >= len(opts) || opts[i+1] < 2 || i+int(opts[i+1]) > len(opts) {
			return out
		}
		if o, err := DecodeOption(opts[i : i+int(opts[i+1])]); err == nil {
			out = append(out, o)
		}
		i += int(opts[i+1])
	}
	return out
}

// OptionMAC is the MAC the datapath computes: SipHash-2-4 under key of the
// tuple as sent, the SYN's sequence number and option bytes 4-15,
// truncated to 32 bits.
func OptionMAC(key []byte, t Tuple, seq uint32, o Option) (uint32, error) {
	if len(key) != KeySize {
		return 0, fmt.Errorf("cluster key is %d bytes, want %d", len(key), KeySize)
	}
	k := t.key()
	msg := make([]byte, 0, 56)
	msg = append(msg, k.Saddr[:]...)
	msg = append(msg, k.Daddr[:]...)
	msg = binary.NativeEndian.AppendUint16(msg, k.Sport)
	msg = binary.NativeEndian.AppendUint16(msg, k.Dport)
	msg = append(msg, k.Proto, 0, 0, 0)
	msg = binary.BigEndian.AppendUint32(msg, seq)
	msg = append(msg, o.Encode()[4:16]...)
	return uint32(SipHash24(key, msg)), nil
}

// SipHash24 is SipHash-2-4 (Aumasson, Bernstein) of msg under a 16-byte
// key.
func SipHash24(key, msg []byte) uint64 {
	k0 := binary.LittleEndian.Uint64(key[0:])
	k1 := binary.LittleEndian.Uint64(key[8:])
	v0 := k0 ^ 0x736f6d6570736575
	v1 := k1 ^ 0x646f72616e646f6d
	v2 := k0 ^ 0x6c7967656e657261
	v3 := k1 ^ 0x7465646279746573
	round := func() {
		v0 += v1
		v1 = bits.RotateLeft64(v1, 13)
		v1 ^= v0
		v0 = bits.RotateLeft64(v0, 32)
		v2 += v3
		v3 = bits.RotateLeft64(v3, 16)
		v3 ^= v2
		v0 += v3
		v3 = bits.RotateLeft64(v3, 21)
		v3 ^= v0
		v2 += v1
		v1 = bits.RotateLeft64(v1, 17)
		v1 ^= v2
		v2 = bits.RotateLeft64(v2, 32)
	}
	n := len(msg)
	for len(msg) >= 8 {
		m := binary.LittleEndian.Uint64(msg)
		v3 ^= m
		round()
		round()
		v0 ^= m
		msg = msg[8:]
	}
	var last [8]byte
	copy(last[:], msg)
	last[7] = byte(n)
	b := binary.LittleEndian.Uint64(last[:])
	v3 ^= b
	round()
	round()
	v0 ^= b
	v2 ^= 0xff
	round()
	round()
	round()
	round()
	return v0 ^ v1 ^ v2 ^ v3
}
