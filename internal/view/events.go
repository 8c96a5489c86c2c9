package view

import (
	"context"
	"errors"
	"log/slog"

	"github.com/pktmeta/pktmeta/internal/datapath"
)

// FollowEvents reads the datapath's event ring buffer until ctx ends or fn
// returns false, handing fn each event with its identities resolved. The
// workload table is read again when an event names a workload registered
// since. Events that cannot be decoded are skipped, and said so once: a
// reader of an older release meets event layouts it does not know.
func FollowEvents(ctx context.Context, d *datapath.Datapath, remote Remote, fn func(Event) bool) error {
	rd, err := d.NewEventReader()
	if err != nil {
		return err
	}
	defer rd.Close()
	stop := context.AfterFunc(ctx, func() { rd.Close() })
	defer stop()
	res, err := NewResolver(d)
	if err != nil {
		return err
	}
	res.Remote = remote
	warned := false
	for {
		ev, err := rd.Read()
		switch {
		case errors.Is(err, datapath.ErrClosed):
			return nil
		case errors.Is(err, datapath.ErrBadEvent):
			if !warned {
				warned = true
				slog.Warn("skipping events this build cannot decode; is the datapath of another release? use the pktmetactl and agent of the installed release", "err", err)
			}
			continue
		case err != nil:
			return err
		}
		if (ev.Flags&datapath.FlagRemote == 0 && !res.Has(ev.OriginWorkload)) || (ev.PeerWorkload != 0 && !res.Has(ev.PeerWorkload)) {
			if err := res.Refresh(d); err != nil {
				return err
			}
		}
		if !fn(res.EventFrom(ev)) {
			return nil
		}
	}
}
