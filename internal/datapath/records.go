package datapath

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// L4 protocols the datapath tracks.
const (
	ProtoTCP = unix.IPPROTO_TCP
	ProtoUDP = unix.IPPROTO_UDP
)

// Tuple is a connection's 5-tuple in one direction.
type Tuple struct {
	Proto uint8
	Src   netip.AddrPort
	Dst   netip.AddrPort
}

// ParseProto accepts "tcp" and "udp".
func ParseProto(s string) (uint8, error) {
	switch strings.ToLower(s) {
	case "tcp":
		return ProtoTCP, nil
	case "udp":
		return ProtoUDP, nil
	}
	return 0, fmt.Errorf("unknown protocol %q (want tcp or udp)", s)
}

// ProtoName is the inverse of ParseProto.
func ProtoName(p uint8) string {
	switch p {
	case ProtoTCP:
		return "tcp"
	case ProtoUDP:
		return "udp"
	}
	return strconv.Itoa(int(p))
}

// Reverse returns the tuple of the opposite direction.
func (t Tuple) Reverse() Tuple { return Tuple{Proto: t.Proto, Src: t.Dst, Dst: t.Src} }

func (t Tuple) String() string {
	return fmt.Sprintf("%s %s -> %s", ProtoName(t.Proto), t.Src, t.Dst)
}

// IsValid reports whether both ends are set.
func (t Tuple) IsValid() bool { return t.Src.IsValid() && t.Dst.IsValid() }

func (t Tuple) key() bpfPktmetaTuple {
	k := bpfPktmetaTuple{
		Saddr: t.Src.Addr().As16(),
		Daddr: t.Dst.Addr().As16(),
		Proto: t.Proto,
	}
	// Ports are stored in network order; the struct is read in host order.
	k.Sport = nativePort(t.Src.Port())
	k.Dport = nativePort(t.Dst.Port())
	return k
}

func nativePort(p uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], p)
	return binary.NativeEndian.Uint16(b[:])
}

func tupleFromKey(k *bpfPktmetaTuple) Tuple {
	if k.Proto == 0 {
		return Tuple{}
	}
	return Tuple{
		Proto: k.Proto,
		Src:   netip.AddrPortFrom(netip.AddrFrom16(k.Saddr).Unmap(), nativePort(k.Sport)),
		Dst:   netip.AddrPortFrom(netip.AddrFrom16(k.Daddr).Unmap(), nativePort(k.Dport)),
	}
}

// Record flags (PKTMETA_F_*).
const (
	FlagDelivered   = 1 << 0
	FlagNAT         = 1 << 1
	FlagFINOrig     = 1 << 2
	FlagFINReply    = 1 << 3
	FlagUDP         = 1 << 4
	FlagEstablished = 1 << 5
	FlagCTSeen      = 1 << 6
	FlagQuiet       = 1 << 7
	FlagRemote      = 1 << 8
)

// A remote record's ConnID: connRemote, the origin node in bits 44-59 and
// the origin node's own conn id (its low 44 bits) below them.
const (
	connRemote     = 1 << 63
	connOriginBits = 44
	// ConnOriginMask selects the bits of a conn id the option carries.
	ConnOriginMask = 1<<connOriginBits - 1
)

// Record is one connection's stash entry.
type Record struct {
	Version   uint8
	Tuple     Tuple // as the origin sent it (the key)
	Flags     uint32
	ConnID    uint64
	FirstSeen time.Time
	LastSeen  time.Time
	Delivered time.Time // zero until delivered
	// OriginNode is the node a remote record's connection was opened on
	// (0: this node). OriginWorkload is a workload id of that node.
	OriginNode     uint16
	OriginWorkload uint32
	OriginIfindex  uint32 // the host veth, or for a remote record the uplink it came in by
	PeerWorkload   uint32
	PeerIfindex    uint32
	PeerTuple      Tuple // as the receiver saw it, once delivered
	SynSeq         uint32
}

// IsDelivered reports whether the first packet reached a pod on this node.
func (r *Record) IsDelivered() bool { return r.Flags&FlagDelivered != 0 }

// ConnOriginNode is the origin node a remote record's conn id names (0 for
// this node's own).
func ConnOriginNode(connID uint64) uint16 {
	if connID&connRemote == 0 {
		return 0
	}
	return uint16(connID >> connOriginBits)
}

// IsRemote reports whether a pod on another node opened the connection.
func (r *Record) IsRemote() bool { return r.Flags&FlagRemote != 0 }

// OriginConnID is the connection's id on the node that opened it: ConnID
// for this node's own records; for a remote one, the low 44 bits of the
// origin node's id for it (all of it until a CPU there has opened 2^32
// connections).
func (r *Record) OriginConnID() uint64 {
	if r.IsRemote() {
		return r.ConnID & ConnOriginMask
	}
	return r.ConnID
}

// flagsInternal are the datapath's claims in progress (bits 30 and 31),
// never part of what a record says.
const flagsInternal = 3 << 30

func decodeRecord(k *bpfPktmetaTuple, v *bpfPktmetaRecord, clk monoClock) Record {
	r := Record{
		Version:        v.Version,
		Tuple:          tupleFromKey(k),
		Flags:          v.Flags &^ flagsInternal,
		ConnID:         v.ConnId,
		FirstSeen:      clk.wall(v.FirstSeenNs),
		LastSeen:       clk.wall(v.LastSeenNs),
		OriginNode:     v.OriginNode,
		OriginWorkload: v.OriginWorkload,
		OriginIfindex:  v.OriginIfindex,
		PeerWorkload:   v.PeerWorkload,
		PeerIfindex:    v.PeerIfindex,
		SynSeq:         v.SynSeq,
	}
	if r.IsDelivered() {
		r.Delivered = clk.wall(v.DeliveredNs)
		r.PeerTuple = tupleFromKey(&v.PeerTuple)
	}
	return r
}

// monoClock converts the datapath's CLOCK_MONOTONIC nanoseconds to wall
// time, with one offset sampled per read so a listing is consistent.
type monoClock struct{ offset time.Duration }

func newMonoClock() monoClock {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return monoClock{}
	}
	return monoClock{offset: time.Duration(time.Now().UnixNano() - ts.Nano())}
}

func (c monoClock) wall(mono uint64) time.Time {
	if mono == 0 {
		return time.Time{}
	}
	return time.Unix(0, int64(mono)+int64(c.offset))
}

// WallTime converts a datapath timestamp (CLOCK_MONOTONIC ns) to wall time.
func WallTime(mono uint64) time.Time { return newMonoClock().wall(mono) }

// ErrNoRecord means the datapath knows nothing of a tuple.
var ErrNoRecord = errors.New("no record")

// lookupRecord reads the record under key: the table's walk, and a slot
// read until two reads agree (readSlot).
func (d *Datapath) lookupRecord(key *bpfPktmetaTuple, v *bpfPktmetaRecord) error {
	var s bpfPktmetaSlot
	for range 8 {
		err := d.findSlot(key, &s)
		if errors.Is(err, errChanging) {
			continue
		}
		if err != nil {
			return err
		}
		*v = s.Rec
		return nil
	}
	return fmt.Errorf("%w: %w", errChanging, ebpf.ErrKeyNotExist)
}

// lookupAlias reads the alias under key the same way.
func (d *Datapath) lookupAlias(key *bpfPktmetaTuple, a *bpfPktmetaAlias) error {
	if err := d.AliasesMap.Lookup(key, a); err != nil {
		return err
	}
	for range 8 {
		var again bpfPktmetaAlias
		if err := d.AliasesMap.Lookup(key, &again); err != nil {
			return err
		}
		if again == *a {
			return nil
		}
		*a = again
	}
	return fmt.Errorf("alias keeps changing while read: %w", ebpf.ErrKeyNotExist)
}

// Lookup finds the record a tuple belongs to, the way pktmeta_lookup() in
// the public header does: the origin's tuple directly, a receiver's
// post-NAT tuple through its alias. Either direction is accepted: a reply
// tuple is reversed.
func (d *Datapath) Lookup(t Tuple) (Record, error) {
	clk := newMonoClock()
	for _, q := range []Tuple{t, t.Reverse()} {
		key := q.key()
		var v bpfPktmetaRecord
		err := d.lookupRecord(&key, &v)
		if err == nil {
			return decodeRecord(&key, &v, clk), nil
		}
		if !errors.Is(err, ebpf.ErrKeyNotExist) {
			return Record{}, fmt.Errorf("look up %s: %w", q, err)
		}
		var a bpfPktmetaAlias
		err = d.lookupAlias(&key, &a)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			continue
		}
		if err != nil {
			return Record{}, fmt.Errorf("look up alias %s: %w", q, err)
		}
		err = d.lookupRecord(&a.Origin, &v)
		if err == nil && v.ConnId == a.ConnId {
			return decodeRecord(&a.Origin, &v, clk), nil
		}
		if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return Record{}, fmt.Errorf("look up %s: %w", tupleFromKey(&a.Origin), err)
		}
	}
	return Record{}, fmt.Errorf("%s: %w", t, ErrNoRecord)
}

// Records lists every live record. It reads the table in batches of 4096
// slots (one syscall each, twice: see liveSlots): DEL, GC and the CLI walk
// it, and at a million records one syscall per entry would take seconds.
func (d *Datapath) Records() ([]Record, error) {
	clk := newMonoClock()
	var out []Record
	err := d.liveSlots(func(s *bpfPktmetaSlot) {
		out = append(out, decodeRecord(&s.Key, &s.Rec, clk))
	})
	if err != nil {
		return nil, fmt.Errorf("list records: %w", err)
	}
	return out, nil
}

// Alias is a receiver-side tuple pointing at an origin record.
type Alias struct {
	Seen   Tuple
	Origin Tuple
	ConnID uint64
}

// Aliases lists every alias.
func (d *Datapath) Aliases() ([]Alias, error) {
	var out []Alias
	var (
		k bpfPktmetaTuple
		v bpfPktmetaAlias
	)
	it := d.AliasesMap.Iterate()
	for it.Next(&k, &v) {
		out = append(out, Alias{Seen: tupleFromKey(&k), Origin: tupleFromKey(&v.Origin), ConnID: v.ConnId})
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list aliases: %w", err)
	}
	return out, nil
}
