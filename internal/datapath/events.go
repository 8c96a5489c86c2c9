package datapath

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"time"

	"github.com/cilium/ebpf/ringbuf"
)

// Event types (PKTMETA_EV_*).
const (
	EventOpened    = 1
	EventDelivered = 2
	EventClosed    = 3
)

// Close reasons (PKTMETA_CLOSE_*).
const (
	CloseFIN = 1
	CloseRST = 2
)

// Event is one ring-buffer event.
type Event struct {
	Type           uint8
	Reason         uint8
	Flags          uint32
	ConnID         uint64
	Time           time.Time
	OriginWorkload uint32
	PeerWorkload   uint32
	Ifindex        uint32
	Tuple          Tuple // as the origin sent it
	Seen           Tuple // DELIVERED: as the receiver saw it
}

// TypeName names an event type.
func (e *Event) TypeName() string {
	switch e.Type {
	case EventOpened:
		return "opened"
	case EventDelivered:
		return "delivered"
	case EventClosed:
		return "closed"
	}
	return fmt.Sprintf("type%d", e.Type)
}

// ReasonName names a close reason.
func (e *Event) ReasonName() string {
	switch e.Reason {
	case CloseFIN:
		return "fin"
	case CloseRST:
		return "rst"
	}
	return ""
}

// PollInterval bounds how long an event waits in the ring buffer for its
// reader: the datapath wakes readers only when the buffer fills up (a
// wakeup costs more than the rest of a first packet), so readers poll.
const PollInterval = 100 * time.Millisecond

// EventReader follows the events ring buffer.
type EventReader struct {
	rd       *ringbuf.Reader
	clk      monoClock
	deadline time.Time
}

// NewEventReader opens a reader on the events ring buffer. A ring buffer
// has one consumer position: two readers split the events between them.
func (d *Datapath) NewEventReader() (*EventReader, error) {
	rd, err := ringbuf.NewReader(d.EventsMap)
	if err != nil {
		return nil, fmt.Errorf("open event ring buffer: %w", err)
	}
	return &EventReader{rd: rd, clk: newMonoClock()}, nil
}

// ErrBadEvent is an event that cannot be decoded; the next one may be fine.
var ErrBadEvent = errors.New("bad event")

// ErrClosed is returned by Read after Close.
var ErrClosed = ringbuf.ErrClosed

// SetDeadline makes Read return os.ErrDeadlineExceeded after t.
func (r *EventReader) SetDeadline(t time.Time) { r.deadline = t }

// Read blocks until the next event, looking at the buffer at least every
// PollInterval.
func (r *EventReader) Read() (Event, error) {
	for {
		next := time.Now().Add(PollInterval)
		if !r.deadline.IsZero() && r.deadline.Before(next) {
			next = r.deadline
		}
		r.rd.SetDeadline(next)
		rec, err := r.rd.Read()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			if !r.deadline.IsZero() && !time.Now().Before(r.deadline) {
				return Event{}, err
			}
			continue
		}
		if err != nil {
			return Event{}, err
		}
		return decodeEvent(rec.RawSample, r.clk)
	}
}

// Close stops the reader; a blocked Read returns ErrClosed.
func (r *EventReader) Close() error { return r.rd.Close() }

// decodeEvent decodes either layout the programs write: the compact one
// for IPv4 tuples (pktmeta_event_v4, 64 bytes) or the full one (120 bytes).
// A ring record's length is exact, so the size tells them apart.
func decodeEvent(raw []byte, clk monoClock) (Event, error) {
	if len(raw) == binary.Size(bpfPktmetaEventV4{}) {
		return decodeEventV4(raw, clk)
	}
	var e bpfPktmetaEvent
	if len(raw) < binary.Size(e) {
		return Event{}, fmt.Errorf("%w: %d bytes, want %d or %d", ErrBadEvent, len(raw), binary.Size(bpfPktmetaEventV4{}), binary.Size(e))
	}
	if err := binary.Read(bytes.NewReader(raw), binary.NativeEndian, &e); err != nil {
		return Event{}, fmt.Errorf("%w: %v", ErrBadEvent, err)
	}
	if e.Version != RecordVersion {
		return Event{}, fmt.Errorf("%w: version %d, want %d", ErrBadEvent, e.Version, RecordVersion)
	}
	return Event{
		Type:           e.Type,
		Reason:         e.Reason,
		Flags:          e.Flags,
		ConnID:         e.ConnId,
		Time:           clk.wall(e.TsNs),
		OriginWorkload: e.OriginWorkload,
		PeerWorkload:   e.PeerWorkload,
		Ifindex:        e.Ifindex,
		Tuple:          tupleFromKey(&e.Tuple),
		Seen:           tupleFromKey(&e.Seen),
	}, nil
}

func decodeEventV4(raw []byte, clk monoClock) (Event, error) {
	var e bpfPktmetaEventV4
	if err := binary.Read(bytes.NewReader(raw), binary.NativeEndian, &e); err != nil {
		return Event{}, fmt.Errorf("%w: %v", ErrBadEvent, err)
	}
	if e.Version != RecordVersion {
		return Event{}, fmt.Errorf("%w: version %d, want %d", ErrBadEvent, e.Version, RecordVersion)
	}
	ev := Event{
		Type:           e.Type,
		Reason:         e.Reason,
		Flags:          e.Flags,
		ConnID:         e.ConnId,
		Time:           clk.wall(e.TsNs),
		OriginWorkload: e.OriginWorkload,
		PeerWorkload:   e.PeerWorkload,
		Ifindex:        e.Ifindex,
		Tuple:          tupleV4(e.Proto, e.Saddr, e.Daddr, e.Sport, e.Dport),
	}
	if e.Type == EventDelivered {
		ev.Seen = tupleV4(e.Proto, e.SeenSaddr, e.SeenDaddr, e.SeenSport, e.SeenDport)
	}
	return ev, nil
}

// tupleV4 builds a tuple from the compact event's fields: addresses as the
// four bytes in memory, ports in network order, as in a key.
func tupleV4(proto uint8, saddr, daddr uint32, sport, dport uint16) Tuple {
	var s, d [4]byte
	binary.NativeEndian.PutUint32(s[:], saddr)
	binary.NativeEndian.PutUint32(d[:], daddr)
	return Tuple{
		Proto: proto,
		Src:   netip.AddrPortFrom(netip.AddrFrom4(s), nativePort(sport)),
		Dst:   netip.AddrPortFrom(netip.AddrFrom4(d), nativePort(dport)),
	}
}
