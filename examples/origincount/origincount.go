// Package origincount is an example pktmeta consumer: a tc program on a
// pod's own interface that counts incoming connections by the workload that
// opened them, read through pktmeta's public header. See bpf/origincount.c.
package origincount

import (
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/pktmeta/pktmeta/consumer"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
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

// Attach puts the program on ifindex's ingress, in the calling thread's
// network namespace, behind whatever is there: a tcx link where the kernel
// has tcx (Linux 6.6), else a direct-action cls_bpf filter on a clsact
// qdisc (the program's -1 is TCX_NEXT to tcx and TC_ACT_UNSPEC to tc: run
// what comes next). Closing the result detaches it.
func (c *Counter) Attach(ifindex int) (io.Closer, error) {
	l, err := link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: c.objs.Origincount, Attach: ebpf.AttachTCXIngress, Anchor: link.Tail()})
	if err == nil {
		return l, nil
	}
	if !errors.Is(err, ebpf.ErrNotSupported) {
		return nil, fmt.Errorf("attach origincount to ifindex %d: %w", ifindex, err)
	}
	return attachClsact(ifindex, c.objs.Origincount)
}

// legacyPrio is the filter's priority: after any filter already there
// that uses the lower, default ones.
const legacyPrio = 0xfe00

// clsactFilter is a cls_bpf filter on ingress, removed on Close through
// the namespace it was added in.
type clsactFilter struct {
	h            *netlink.Handle
	filter       *netlink.BpfFilter
	qdisc        netlink.Qdisc // non-nil if Attach added the clsact
	ifindex      int
	removeFilter sync.Once
}

func attachClsact(ifindex int, prog *ebpf.Program) (io.Closer, error) {
	h, err := netlink.NewHandle() // bound to the calling thread's netns
	if err != nil {
		return nil, fmt.Errorf("netlink: %w", err)
	}
	c := &clsactFilter{h: h, ifindex: ifindex}
	q := &netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{LinkIndex: ifindex, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT},
		QdiscType:  "clsact",
	}
	switch err := h.QdiscAdd(q); {
	case err == nil:
		c.qdisc = q
	case !errors.Is(err, unix.EEXIST):
		h.Close()
		return nil, fmt.Errorf("add clsact to ifindex %d (no tcx on this kernel): %w", ifindex, err)
	}
	c.filter = &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{LinkIndex: ifindex, Parent: netlink.HANDLE_MIN_INGRESS, Handle: 1,
			Protocol: unix.ETH_P_ALL, Priority: legacyPrio},
		Fd: prog.FD(), Name: "origincount", DirectAction: true,
	}
	if err := h.FilterAdd(c.filter); err != nil {
		c.Close()
		return nil, fmt.Errorf("add cls_bpf filter to ifindex %d (no tcx on this kernel): %w", ifindex, err)
	}
	return c, nil
}

func (c *clsactFilter) Close() error {
	var err error
	c.removeFilter.Do(func() {
		if c.filter != nil {
			if e := c.h.FilterDel(c.filter); e != nil && !errors.Is(e, unix.ENOENT) {
				err = fmt.Errorf("remove origincount filter from ifindex %d: %w", c.ifindex, e)
			}
		}
		if c.qdisc != nil {
			c.h.QdiscDel(c.qdisc)
		}
		c.h.Close()
	})
	return err
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

// Remote returns how many connections pods on other nodes opened.
func (c *Counter) Remote() (uint64, error) {
	var n uint64
	err := c.objs.Remote.Lookup(uint32(0), &n)
	return n, err
}

// Unknown returns how many packets pktmeta had no record for.
func (c *Counter) Unknown() (uint64, error) {
	var n uint64
	err := c.objs.Unknown.Lookup(uint32(0), &n)
	return n, err
}

// Close releases the program and maps.
func (c *Counter) Close() error { return c.objs.Close() }
