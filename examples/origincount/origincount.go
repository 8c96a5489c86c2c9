// Package origincount is an example pktmeta consumer: a tc program on a
// pod's own interface that counts incoming connections by the workload that
// opened them, read through pktmeta's public header. See bpf/origincount.c.
package origincount

import (
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/pktmeta/pktmeta/consumer"
)

//go:generate go tool bpf2go -cc clang-19 -strip llvm-strip-19 -cflags "-O2 -g -Wall -Werror -mcpu=v3 -I../../bpf/include -I/usr/include/x86_64-linux-gnu" -target bpfel -go-package origincount -type origin_count bpf bpf/origincount.c

// Counter is the loaded program and its maps.
type Counter struct {
	objs bpfObjects
}

// Load loads the program against the pinned pktmeta maps under pinPath.
func Load(pinPath string) (*Counter, error) {
	spec, err := loadBpf()
	if err != nil {
		return nil, err
	}
	repl, err := consumer.Maps(spec, pinPath)
	if err != nil {
		return nil, err
	}
	defer func() {
		for _, m := range repl {
			m.Close()
		}
	}()
	c := &Counter{}
	if err := spec.LoadAndAssign(&c.objs, &ebpf.CollectionOptions{MapReplacements: repl}); err != nil {
		return nil, fmt.Errorf("load origincount: %w", err)
	}
	return c, nil
}

// Attach puts the program on ifindex's tcx ingress, in the calling
// thread's network namespace. Closing the link detaches it.
func (c *Counter) Attach(ifindex int) (link.Link, error) {
	l, err := link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: c.objs.Origincount, Attach: ebpf.AttachTCXIngress, Anchor: link.Tail()})
	if err != nil {
		return nil, fmt.Errorf("attach origincount to ifindex %d: %w", ifindex, err)
	}
	return l, nil
}

// Counts returns connections seen per origin workload id.
func (c *Counter) Counts() (map[uint32]uint64, error) {
	out := map[uint32]uint64{}
	var (
		id uint32
		v  bpfOriginCount
	)
	it := c.objs.Counts.Iterate()
	for it.Next(&id, &v) {
		out[id] = v.Connections
	}
	return out, it.Err()
}

// Unknown returns how many packets pktmeta had no record for.
func (c *Counter) Unknown() (uint64, error) {
	var n uint64
	err := c.objs.Unknown.Lookup(uint32(0), &n)
	return n, err
}

// Close releases the program and maps.
func (c *Counter) Close() error { return c.objs.Close() }
