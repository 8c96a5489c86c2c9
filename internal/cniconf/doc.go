// Package cniconf puts the pktmeta entry into a node's CNI configuration,
// keeps it there while the primary CNI rewrites its own file, and takes it
// out again.
//
// # Which file
//
// Container runtimes use the first network configuration in the CNI config
// directory: libcni's ConfFiles(dir, {".conf", ".conflist", ".json"}),
// sorted by name. [FindPrimary] picks the same file, skipping files that do
// not parse or are not valid (no plugins, a .conf without "type", a
// conflist without "name"), as CRI-O's ocicni does. containerd's go-cni
// does not skip them: it loads no network at all while such a file sorts
// first, so with containerd an invalid file ahead of the primary breaks pod
// networking whatever this package does. Unlike ocicni, FindPrimary does
// not require the plugin binaries to be installed: the primary's may not be
// yet. Names without those extensions, such as our own temporary files
// (".pktmeta-tmp-*") and kindnet's ("*.temp"), are never configs. When the
// runtimes' choice has a cniVersion the plugin does not speak, there is no
// usable primary either: the files after it are shadowed by it.
//
// Without a usable primary, the error is a [*NoPrimaryError]: it names
// every entry of the directory and why it is not used (not JSON, no
// plugins, unsupported cniVersion, shadowed by a higher-priority file, our
// own temporary file, not a config name, ...), for the caller to log or
// to fail with ([LogNoPrimary] logs it the way Watch does).
//
// # Install
//
// [Install] appends the caller's entry ("type": "pktmeta") to the end of the
// primary's plugins list, or replaces an existing entry of that type (one
// entry at the end, never two). A single-plugin .conf or .json is converted
// into a .conflist of the same base name,
//
//	{"cniVersion": ..., "name": ..., "plugins": [<the conf minus cniVersion and name>, <entry>]}
//
// and the original removed, because a runtime would pick "10-x.conf" before
// "10-x.conflist". Unknown keys, key order and numbers of everything else
// are kept as they were; only whitespace changes (two-space indentation).
// A file is written only when its content would change: Install is
// idempotent and an unchanged file keeps its mtime. [Check] tells, without
// writing, whether the entry is in place (for a readiness probe).
//
// Install refuses, rather than break every pod's ADD, to write a config
// libcni would not load, a network whose cniVersion the plugin does not
// speak, or a network with plugins in <dir>/<name>/*.conf (libcni runs
// those after the list, so pktmeta would not be last).
//
// Writes are atomic: a temporary file ".pktmeta-tmp-<random>" in the same
// directory (an extension libcni ignores), written, fsynced, given the
// original's mode and owner (the owner only when it is ours already or we
// hold CAP_CHOWN; otherwise with a warning), renamed over the original, and
// the directory fsynced. A file that changes between our read and our
// rename is not clobbered: the write is abandoned and retried with the new
// content. A symlinked config is replaced by a regular file (Uninstall
// restores the link).
//
// A process killed between create and rename leaves its temporary file
// behind (up to a whole plugin binary). Install, Uninstall and
// InstallBinary remove those leftovers from ConfDir, StateDir/cni-backup
// and BinDir first, whatever their age. Writers hold a shared flock on the
// directory while their temporary file exists, and the cleaner removes
// files only while it holds the exclusive one, so an installer running at
// the same moment, in any process or container, never loses its file
// (files.go says why this design).
//
// # Backups and uninstall
//
// Before a file is first modified, its exact bytes, mode and owner are
// saved in <StateDir>/cni-backup/<target>.json, together with the sha256 of
// what was written (target is the file that holds our entry: the conflist,
// or the conflist a .conf became). When the primary later rewrites its file
// (kindnet and aws-node do), its new content becomes the backup. [Uninstall]
// restores the backup byte for byte when the file is still exactly what we
// last wrote (a converted .conf comes back and our .conflist goes), and
// otherwise removes only our entry from whatever the file holds now. It then
// removes any other pktmeta entry left in the directory (for instance in a
// file that was primary before a higher-priority one appeared) and the
// plugin binary when it is ours. A second Uninstall does nothing.
//
// Install and Uninstall take an flock on <StateDir>/cni-backup/.lock, so
// two processes sharing a state dir never interleave their writes.
//
// # Watch
//
// [Watch] runs Install at once and again whenever the config directory
// changes (fsnotify, with a full re-check every Resync for missed events),
// after a quiet Debounce (200 ms; at most 1 s while events keep coming).
// When one file needs more than FightRepairs repairs within FightWindow (5
// in 60 s), some other writer is fighting us: Watch logs a warning naming
// the file and delays every further repair, starting at 5×Debounce and
// doubling up to MaxBackoff (60 s), until a whole FightWindow passes
// without a repair. Every install, repair, backoff, calm and error is
// reported to the caller's callback as an [Event], for metrics.
//
// The package keeps no global state; all logging goes to Options.Logger.
package cniconf
