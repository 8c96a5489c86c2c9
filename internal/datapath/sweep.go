package datapath

import (
	"cmp"
	"encoding/binary"
	"fmt"
	"time"

	"github.com/cilium/ebpf"
)

// How the sweep judges TCP records by conntrack: only records at least
// this old are looked up, so that a connection whose first packet has not
// reached conntrack yet (the origin hook runs before PREROUTING) is never
// judged.
const sweepCTMinAge = 10 * time.Second

// Sweep flags (PKTMETA_SWEEP_*).
const (
	sweepConntrack = 1 << 0
	sweepAliases   = 1 << 1
	sweepForgetUDP = 1 << 2
)

const sweepMagic = 0x7065657773746d70

var errNoSweeper = fmt.Errorf("program %s is not pinned (an interrupted upgrade: the next ADD or the agent completes it)", ProgSweep)

// SweepOptions say what a sweep removes.
type SweepOptions struct {
	// Workload: the records this workload opened or received (its DEL).
	Workload uint32
	// Hygiene: UDP records idle past the UDP timeout, TCP records whose
	// connection conntrack says is over, TCP records whose handshake did
	// not complete within DefaultTCPHandshakeTimeout, and aliases whose
	// record is gone.
	Hygiene bool
	// TCPHandshakeTimeout overrides DefaultTCPHandshakeTimeout (tests).
	TCPHandshakeTimeout time.Duration
	// ConntrackMinAge overrides how old a TCP record must be before
	// conntrack is asked about it (tests).
	ConntrackMinAge time.Duration
}

// SweepResult counts what a sweep removed.
type SweepResult struct {
	Visited         int  `json:"visited"`
	RemovedWorkload int  `json:"removedWorkload"`
	UDPIdle         int  `json:"udpIdle"`
	TCPPending      int  `json:"tcpPending"`
	TCPOver         int  `json:"tcpOver"`
	Aliases         int  `json:"aliases"`
	CTChecked       int  `json:"ctChecked"`
	CTUnavailable   bool `json:"ctUnavailable,omitempty"`
}

// Removed is the number of records removed.
func (r SweepResult) Removed() int { return r.RemovedWorkload + r.UDPIdle + r.TCPPending + r.TCPOver }

// Sweep runs the pktmeta_sweep program once over the connection table, in
// the kernel: CNI DEL (one workload), CNI GC and the agent (hygiene) all
// go through it. Conntrack is asked in the calling thread's network
// namespace, which must be the one holding the pod veths.
func (d *Datapath) Sweep(o SweepOptions) (SweepResult, error) {
	var res SweepResult
	if err := d.writable(); err != nil {
		return res, err
	}
	if d.Sweeper == nil {
		return res, errNoSweeper
	}
	args := bpfPktmetaSweepArgs{Magic: sweepMagic, Workload: o.Workload}
	if o.Hygiene {
		cfg, err := d.ReadConfig()
		if err != nil {
			return res, err
		}
		args.Flags = sweepConntrack | sweepAliases
		args.UdpIdleNs = uint64(cfg.UDPTimeout)
		args.TcpPendingNs = uint64(cmp.Or(o.TCPHandshakeTimeout, DefaultTCPHandshakeTimeout))
		args.CtMinAgeNs = uint64(cmp.Or(o.ConntrackMinAge, sweepCTMinAge))
	}
	args, err := d.runSweep(args)
	if err != nil {
		return res, err
	}
	res = SweepResult{
		Visited:         int(args.Visited),
		RemovedWorkload: int(args.RemovedWorkload),
		UDPIdle:         int(args.RemovedUdpIdle),
		TCPPending:      int(args.RemovedTcpPending),
		TCPOver:         int(args.RemovedTcpOver),
		Aliases:         int(args.RemovedAliases),
		CTChecked:       int(args.CtChecked),
		CTUnavailable:   args.CtUnavailable != 0,
	}
	return res, nil
}

// runSweep runs the sweep program once with args and returns what it wrote
// back.
func (d *Datapath) runSweep(args bpfPktmetaSweepArgs) (bpfPktmetaSweepArgs, error) {
	if err := runOnArgs(d.Sweeper, ProgSweep, &args); err != nil {
		return args, err
	}
	if args.Magic != sweepMagic {
		return args, fmt.Errorf("sweep program did not run (results missing)")
	}
	return args, nil
}

// runOnArgs runs prog (pinned as name) once with BPF_PROG_TEST_RUN on a
// packet of an Ethernet header and *args, and decodes what the program
// wrote back into the packet into *args: the sweep and the table writer
// take their arguments and return their results that way.
func runOnArgs[T any](prog *ebpf.Program, name string, args *T) error {
	in := make([]byte, 14, 14+binary.Size(args))
	in, err := binary.Append(in, binary.NativeEndian, args)
	if err != nil {
		return err
	}
	out := make([]byte, len(in))
	if _, err := prog.Run(&ebpf.RunOptions{Data: in, DataOut: out}); err != nil {
		return fmt.Errorf("run %s program: %w", name, err)
	}
	if _, err := binary.Decode(out[14:], binary.NativeEndian, args); err != nil {
		return fmt.Errorf("%s results: %w", name, err)
	}
	return nil
}
