package cniconf

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/fsnotify/fsnotify"
)

// Defaults of the Watch tuning in Options.
const (
	DefaultDebounce     = 200 * time.Millisecond
	DefaultFightRepairs = 5
	DefaultFightWindow  = time.Minute
	DefaultMaxBackoff   = time.Minute
	DefaultResync       = time.Minute
)

// dirPoll is how often Watch tries to watch a config dir that is missing.
const dirPoll = time.Second

// EventKind says what an Event reports. Its String is suitable as a metric
// label value.
type EventKind int

const (
	// EventInstalled: Watch's first successful Install; the entry is in
	// place now (Result.Changed says whether it had to be written).
	EventInstalled EventKind = iota + 1
	// EventRepaired: the entry was missing or different, or a .conf
	// appeared, and the config was written again.
	EventRepaired
	// EventBackoff: another writer keeps rewriting Path; the next repair
	// waits Backoff.
	EventBackoff
	// EventCalm: the fight over Path is over (a whole FightWindow without
	// a repair, or our entry now lives in another file); repairs are
	// prompt again.
	EventCalm
	// EventNoPrimary: the dir has no usable network config yet; Watch waits
	// for one. Reported once until there is one; Err is the
	// *NoPrimaryError that says why for every file (Watch logs it again
	// whenever that changes).
	EventNoPrimary
	// EventError: Install failed, or events were lost; Err says why. Watch
	// retries with a growing delay.
	EventError
)

func (k EventKind) String() string {
	switch k {
	case EventInstalled:
		return "installed"
	case EventRepaired:
		return "repaired"
	case EventBackoff:
		return "backoff"
	case EventCalm:
		return "calm"
	case EventNoPrimary:
		return "no_primary"
	case EventError:
		return "error"
	}
	return fmt.Sprintf("EventKind(%d)", int(k))
}

// Event is what Watch reports to its caller.
type Event struct {
	Kind EventKind
	// Path is the config file concerned (the one holding our entry), when
	// there is one.
	Path string
	// Result is Install's result, for EventInstalled and EventRepaired.
	Result Result
	// Repairs counts the writes to Path within FightWindow (EventRepaired,
	// EventBackoff).
	Repairs int
	// Backoff is the delay before the next repair (EventBackoff).
	Backoff time.Duration
	// Err is the error (EventError).
	Err error
}

// Watch keeps the entry in the highest-priority CNI config until ctx is
// done, then returns nil. It runs Install at once, and again after every
// change in ConfDir (debounced), every Resync, and after errors; see the
// package documentation for how it handles a writer that fights it.
// onEvent (may be nil) is called from Watch's goroutine and must not block.
// Watch returns an error only when it cannot watch at all.
func Watch(ctx context.Context, opts Options, onEvent func(Event)) error {
	if err := opts.check(true); err != nil {
		return fmt.Errorf("watch: %w", err)
	}
	if _, err := normalizeEntry(opts.Entry); err != nil {
		return fmt.Errorf("watch: %w", err)
	}
	if onEvent == nil {
		onEvent = func(Event) {}
	}
	w := newWatcher(opts, onEvent)
	return w.loop(ctx)
}

type watcher struct {
	opts     Options
	dir      string
	log      *slog.Logger
	emit     func(Event)
	debounce time.Duration
	maxWait  time.Duration
	repairs  int
	window   time.Duration
	maxBack  time.Duration
	resync   time.Duration

	installed bool   // EventInstalled was reported; later writes are repairs
	noPrimary bool   // EventNoPrimary was reported
	whyNone   string // the last no-primary error logged
	errDelay  time.Duration
	// The fight detector: recent writes to path, and the current delay.
	path      string
	writes    []time.Time
	backoff   time.Duration
	notBefore time.Time
}

func newWatcher(opts Options, emit func(Event)) *watcher {
	w := &watcher{
		opts:     opts,
		dir:      filepath.Clean(opts.ConfDir),
		log:      opts.logger(),
		emit:     emit,
		debounce: orDefault(opts.Debounce, DefaultDebounce),
		repairs:  opts.FightRepairs,
		window:   orDefault(opts.FightWindow, DefaultFightWindow),
		maxBack:  orDefault(opts.MaxBackoff, DefaultMaxBackoff),
		resync:   orDefault(opts.Resync, DefaultResync),
	}
	if w.repairs <= 0 {
		w.repairs = DefaultFightRepairs
	}
	w.maxWait = 5 * w.debounce
	return w
}

func orDefault(d, def time.Duration) time.Duration {
	if d <= 0 {
		return def
	}
	return d
}

func (w *watcher) loop(ctx context.Context) error {
	fsw, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("watch %s: %w", w.dir, err)
	}
	defer fsw.Close()

	// poll is non-nil while the dir cannot be watched.
	var poll *time.Ticker
	stopPoll := func() {
		if poll != nil {
			poll.Stop()
			poll = nil
		}
	}
	defer stopPoll()
	pollC := func() <-chan time.Time {
		if poll == nil {
			return nil
		}
		return poll.C
	}
	// addWatch watches the dir, or else checks it every dirPoll until it
	// can (it does not exist, or inotify watches are exhausted).
	addWatch := func() {
		err := fsw.Add(w.dir)
		if err == nil {
			if poll != nil {
				w.log.Info("watching the CNI config dir again", "dir", w.dir)
			}
			stopPoll()
			return
		}
		if poll == nil {
			w.log.Warn("cannot watch the CNI config dir; checking it every second", "dir", w.dir, "err", err)
			if !errors.Is(err, fs.ErrNotExist) {
				w.emit(Event{Kind: EventError, Err: fmt.Errorf("watch %s: %w", w.dir, err)})
			}
			poll = time.NewTicker(dirPoll)
		}
	}
	addWatch()

	resync := time.NewTicker(w.resync)
	defer resync.Stop()

	// A run is pending from the first change after the last run; it
	// happens Debounce after the last change, but no later than maxWait
	// after the first, and never before notBefore.
	timer := time.NewTimer(0)
	defer timer.Stop()
	pending, first := true, time.Now()
	schedule := func(due time.Time) {
		now := time.Now()
		if !pending {
			pending, first = true, now
		}
		if lim := first.Add(w.maxWait); due.After(lim) {
			due = lim
		}
		if due.Before(w.notBefore) {
			due = w.notBefore
		}
		timer.Reset(due.Sub(now))
	}
	changed := func() { schedule(time.Now().Add(w.debounce)) }

	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-fsw.Events:
			if !ok {
				return fmt.Errorf("watch %s: watcher closed", w.dir)
			}
			if ev.Name == w.dir {
				if ev.Has(fsnotify.Remove) || ev.Has(fsnotify.Rename) {
					w.log.Warn("CNI config dir removed; waiting for it to come back", "dir", w.dir)
					addWatch()
					changed()
				}
				continue
			}
			if relevant(ev) {
				changed()
			}
		case err, ok := <-fsw.Errors:
			if !ok {
				return fmt.Errorf("watch %s: watcher closed", w.dir)
			}
			w.log.Warn("CNI config dir watch", "dir", w.dir, "err", err)
			w.emit(Event{Kind: EventError, Err: fmt.Errorf("watch %s: %w", w.dir, err)})
			changed()
		case <-pollC():
			addWatch()
			changed()
		case <-resync.C:
			changed()
		case <-timer.C:
			if !pending {
				continue
			}
			pending = false
			if retry := w.run(time.Now()); retry > 0 {
				schedule(time.Now().Add(retry))
			}
		}
	}
}

// relevant: an event that may change which config runtimes use, or what
// it says.
func relevant(ev fsnotify.Event) bool {
	name := filepath.Base(ev.Name)
	if strings.HasPrefix(name, tempPrefix) || ev.Op == fsnotify.Chmod {
		return false
	}
	return slices.Contains(extensions, filepath.Ext(name))
}

// run runs Install once and updates the fight detector. It returns the
// delay before a retry, or 0 when only the next change needs one.
func (w *watcher) run(now time.Time) time.Duration {
	res, err := Install(w.opts)
	switch {
	case errors.Is(err, ErrNoPrimary):
		w.errDelay = 0
		if msg := err.Error(); !w.noPrimary || msg != w.whyNone {
			w.whyNone = msg
			LogNoPrimary(w.log, err, "waiting for the primary CNI")
		}
		if !w.noPrimary {
			w.noPrimary = true
			w.emit(Event{Kind: EventNoPrimary, Err: err})
		}
		return 0
	case err != nil:
		w.errDelay = min(max(2*w.errDelay, w.maxWait), w.maxBack)
		w.log.Error("cannot install the pktmeta entry; retrying", "err", err, "retryIn", w.errDelay)
		w.emit(Event{Kind: EventError, Path: res.Path, Err: err})
		return w.errDelay
	}
	w.errDelay = 0
	w.noPrimary = false

	if !res.Changed {
		if !w.installed {
			w.installed = true
			w.emit(Event{Kind: EventInstalled, Path: res.Path, Result: res})
		}
		if w.backoff == 0 {
			return 0
		}
		// The fight is over once a whole window passes without a repair.
		quiet := now.Sub(w.writes[len(w.writes)-1])
		if quiet < w.window {
			return w.window - quiet
		}
		w.log.Info("CNI config left alone again; repairing promptly", "file", w.path, "quietFor", quiet)
		w.emit(Event{Kind: EventCalm, Path: w.path})
		w.calm()
		return 0
	}

	kind := EventRepaired
	if !w.installed {
		kind = EventInstalled
		w.installed = true
	}
	if res.Path != w.path {
		if w.backoff > 0 {
			w.log.Info("pktmeta entry moved to another CNI config; repairing promptly", "file", res.Path, "was", w.path)
			w.emit(Event{Kind: EventCalm, Path: w.path})
		}
		w.calm()
		w.path = res.Path
	}
	// Only repairs count towards a fight: the first install is not one.
	w.writes = slices.DeleteFunc(w.writes, func(t time.Time) bool { return now.Sub(t) >= w.window })
	if kind == EventRepaired {
		w.writes = append(w.writes, now)
	}
	n := len(w.writes)
	if kind == EventRepaired {
		w.log.Debug("pktmeta entry repaired", "file", res.Path, "repairs", n, "window", w.window)
	}
	w.emit(Event{Kind: kind, Path: res.Path, Result: res, Repairs: n})

	switch {
	case w.backoff > 0:
		// Still fighting: every repair doubles the delay.
		w.backoff = min(2*w.backoff, w.maxBack)
		w.log.Info("CNI config still being rewritten; backing off further", "file", res.Path, "backoff", w.backoff)
	case n > w.repairs:
		w.backoff = min(w.maxWait, w.maxBack)
		w.log.Warn("another writer keeps rewriting the CNI config without the pktmeta entry; backing off",
			"file", res.Path, "repairs", n, "window", w.window, "backoff", w.backoff, "maxBackoff", w.maxBack)
	default:
		return 0
	}
	w.notBefore = now.Add(w.backoff)
	w.emit(Event{Kind: EventBackoff, Path: res.Path, Repairs: n, Backoff: w.backoff})
	return 0
}

// LogNoPrimary logs err, an error of [Install] or [FindPrimary] that wraps
// ErrNoPrimary, the way Watch does: every skipped file with its reason, as
// a warning, or at info level when the dir is just empty or missing (a node
// whose primary CNI has not started yet). what says what the caller does
// about it ("waiting for the primary CNI"). log may be nil.
func LogNoPrimary(log *slog.Logger, err error, what string) {
	log = orDiscard(log)
	msg := "no usable CNI network config; " + what
	var np *NoPrimaryError
	switch {
	case !errors.As(err, &np):
		log.Info(msg, "err", err)
	case len(np.Skipped) == 0:
		log.Info(msg, "dir", np.Dir, "missing", np.Missing)
	default:
		log.Warn(msg, "dir", np.Dir, "skipped", np.Files())
	}
}

// calm resets the fight detector.
func (w *watcher) calm() {
	w.path, w.writes, w.backoff, w.notBefore = "", nil, 0, time.Time{}
}
