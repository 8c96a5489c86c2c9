// Command origincount attaches the origincount example to an interface
// inside a network namespace (a pod's eth0) and prints, every interval,
// how many connections each origin workload opened to it.
package main

import (
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"runtime"
	"sort"
	"time"

	"github.com/pktmeta/pktmeta/consumer"
	"github.com/pktmeta/pktmeta/examples/origincount"
	"github.com/vishvananda/netns"
)

func main() {
	pinPath := flag.String("pin-path", consumer.DefaultPinPath, "pktmeta pin path")
	nsPath := flag.String("netns", "", "network namespace of the pod (a /proc/PID/ns/net or /run/netns path); empty: current")
	iface := flag.String("iface", "eth0", "interface to count on")
	interval := flag.Duration("interval", 2*time.Second, "print interval")
	flag.Parse()

	c, err := origincount.Load(*pinPath)
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	// Only the network namespace changes: bpffs stays visible.
	runtime.LockOSThread()
	if *nsPath != "" {
		h, err := netns.GetFromPath(*nsPath)
		if err != nil {
			log.Fatal(err)
		}
		if err := netns.Set(h); err != nil {
			log.Fatal(err)
		}
	}
	ifc, err := net.InterfaceByName(*iface)
	if err != nil {
		log.Fatal(err)
	}
	l, err := c.Attach(ifc.Index)
	if err != nil {
		log.Fatal(err)
	}
	defer l.Close()

	who, err := consumer.OpenIdentities(*pinPath)
	if err != nil {
		log.Fatal(err)
	}
	defer who.Close()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt)
	tick := time.NewTicker(*interval)
	for {
		select {
		case <-sig:
			return
		case <-tick.C:
		}
		counts, err := c.Counts()
		if err != nil {
			log.Fatal(err)
		}
		ids := make([]uint32, 0, len(counts))
		for id := range counts {
			ids = append(ids, id)
		}
		sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
		for _, id := range ids {
			name := fmt.Sprintf("workload %d", id)
			if w, ok, _ := who.Lookup(id); ok {
				name = w.Namespace + "/" + w.Pod
			}
			fmt.Printf("%s\t%d connections\n", name, counts[id])
		}
	}
}
