// Command pause is the sandbox ("pause") image of the crihost test harness:
// the process that holds a pod's namespaces. It is PID 1 of the pod's PID
// namespace when the pod shares one, so it reaps orphaned children, and it
// exits on SIGTERM or SIGINT, which is how containerd stops a sandbox.
//
// It lives under testdata so `go build ./...` of the repository skips it;
// crihost builds it as a static binary in a temp dir.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for sig := range sigs {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		reap()
	}
}

// reap collects every exited child; one SIGCHLD may stand for several.
func reap() {
	for {
		var ws syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
		if pid <= 0 || err != nil {
			return
		}
	}
}
