package testutil

import (
	"runtime"
	"testing"

	"github.com/vishvananda/netns"
)

// InNewNetns runs fn on the test goroutine, locked to its OS thread, inside
// a fresh anonymous network namespace, and moves the thread back afterwards
// (also when fn calls t.Fatal). The namespace is never named or mounted, so
// it disappears with its last reference.
func InNewNetns(t testing.TB, fn func()) {
	t.Helper()
	RequireRoot(t)
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatalf("get netns: %v", err)
	}
	defer orig.Close()
	ns, err := netns.New()
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatalf("new netns: %v", err)
	}
	defer func() {
		ns.Close()
		if err := netns.Set(orig); err != nil {
			// Stay locked: the runtime retires a thread whose goroutine
			// exits locked, so the stray namespace dies with it.
			t.Errorf("restore netns: %v", err)
			return
		}
		runtime.UnlockOSThread()
	}()
	fn()
}

// EnterNetns moves the calling goroutine, locked to its OS thread, into ns
// for the rest of its life. A goroutine starts in the process's namespace,
// not in the one its creator's thread is in; one that must act inside the
// test's namespace (a second sender on another CPU) calls this first. The
// thread is never unlocked, so the runtime retires it when the goroutine
// exits and the namespace never reaches another goroutine.
func EnterNetns(ns netns.NsHandle) error {
	runtime.LockOSThread()
	return netns.Set(ns)
}
