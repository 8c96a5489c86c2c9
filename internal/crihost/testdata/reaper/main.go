// Command reaper runs containerd for the crihost test harness:
//
//	reaper containerd --config FILE
//
// containerd's shims daemonize: they are re-parented to the nearest
// "child subreaper" or else to PID 1. Where PID 1 is not an init that reaps
// orphans (a container or sandbox), every shim that exits would stay a
// zombie forever. reaper makes itself the subreaper, so the shims (and any
// container process whose shim died) become its children and are reaped
// here. It forwards SIGTERM and SIGINT to its command and exits, with the
// command's status, once the command and every adopted process are gone.
//
// It lives under testdata so `go build ./...` of the repository skips it;
// crihost builds it as a static binary. Standard library only.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"
)

const prSetChildSubreaper = 36 // PR_SET_CHILD_SUBREAPER

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: reaper COMMAND [ARG...]")
		os.Exit(2)
	}
	if _, _, errno := syscall.RawSyscall(syscall.SYS_PRCTL, prSetChildSubreaper, 1, 0); errno != 0 {
		fmt.Fprintln(os.Stderr, "reaper: prctl(PR_SET_CHILD_SUBREAPER):", errno)
		os.Exit(1)
	}
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)

	// os.StartProcess, not exec.Cmd: the loop below waits for any child,
	// which would steal the status exec.Cmd.Wait expects.
	p, err := os.StartProcess(os.Args[1], os.Args[1:], &os.ProcAttr{Files: []*os.File{os.Stdin, os.Stdout, os.Stderr}})
	if err != nil {
		fmt.Fprintln(os.Stderr, "reaper:", err)
		os.Exit(1)
	}
	status, mainDone := 0, false
	tick := time.NewTicker(time.Second) // in case a SIGCHLD was coalesced away
	defer tick.Stop()
	for {
		select {
		case sig := <-sigs:
			if sig != syscall.SIGCHLD && !mainDone {
				p.Signal(sig)
			}
		case <-tick.C:
		}
		for {
			var ws syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
			if err == syscall.ECHILD {
				if mainDone {
					os.Exit(status)
				}
				break
			}
			if pid <= 0 || err != nil {
				break
			}
			if pid == p.Pid {
				mainDone = true
				status = ws.ExitStatus()
				if ws.Signaled() {
					status = 128 + int(ws.Signal())
				}
			}
		}
	}
}
