package main

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/pktmeta/pktmeta/internal/cluster"
	"github.com/pktmeta/pktmeta/internal/datapath"
	"github.com/pktmeta/pktmeta/internal/testbed"
)

// crossNode is the demo's last part: two nodes, a connection from a pod on
// one to a pod on the other, and what the second node knows of it.
func (dm *demo) crossNode(o options, tmp string) (err error) {
	dm.section("Across nodes: two nodes, one connection between them")
	pins := map[int]string{}
	c, err := testbed.NewCluster(testbed.ClusterConfig{
		Node: testbed.Config{CNIPath: o.cniPath, NoDAD: true},
		Chain: func(i int) []map[string]any {
			pins[i] = fmt.Sprintf("%s-node-%d", dm.pin, i)
			return []map[string]any{{"type": "pktmeta", "pinPath": pins[i], "tags": map[string]string{"cluster": "demo", "zone": fmt.Sprintf("zone-%d", i)}}}
		},
	})
	if err != nil {
		return fmt.Errorf("build two nodes: %w", err)
	}
	defer func() {
		err = errors.Join(err, c.Close())
		for _, p := range pins {
			if derr := datapath.Destroy(p, nil); derr != nil {
				err = errors.Join(err, cleanupError{derr})
			}
		}
	}()

	f := cluster.File{Version: cluster.FileVersion}
	for _, n := range c.Nodes {
		f.Nodes = append(f.Nodes, cluster.Node{ID: uint16(n.Index), Name: fmt.Sprintf("node-%d", n.Index),
			Addresses: []netip.Addr{n.Addr4, n.Addr6}, PodCIDRs: []netip.Prefix{n.PodCIDR4, n.PodCIDR6}, PinPath: pins[n.Index]})
	}
	clusterFile := filepath.Join(tmp, "cluster.json")
	raw, _ := json.MarshalIndent(f, "", "  ")
	if err := os.WriteFile(clusterFile, raw, 0o600); err != nil {
		return err
	}
	key := make([]byte, datapath.KeySize)
	rand.Read(key)
	keyFile := filepath.Join(tmp, "cluster.key")
	if err := os.WriteFile(keyFile, []byte(hex.EncodeToString(key)), 0o600); err != nil {
		return err
	}
	ctl := func(n *testbed.ClusterNode, args ...string) (string, error) {
		var out []byte
		var cerr error
		err := n.Do(func() error {
			cmd := exec.CommandContext(dm.ctx, dm.ctl, append([]string{"--pin-path", pins[n.Index], "--api-socket", "", "--cluster", clusterFile}, args...)...)
			out, cerr = cmd.CombinedOutput()
			return nil
		})
		return string(out), errors.Join(err, cerr)
	}
	fmt.Fprintln(dm.out, "  Two netns nodes on a bridge, each with its own pods, pins and conntrack, and routes to")
	fmt.Fprintln(dm.out, "  the other's pod CIDR. A cluster file lists them; on each node:")
	for _, n := range c.Nodes {
		args := []string{"node", "set", "--name", fmt.Sprintf("node-%d", n.Index), "--key-file", keyFile, "--uplink", n.Uplink}
		fmt.Fprintf(dm.out, "    pktmetactl --cluster cluster.json %s\n", strings.ReplaceAll(strings.Join(args, " "), keyFile, "cluster.key"))
		if out, err := ctl(n, args...); err != nil {
			return fmt.Errorf("node %d: pktmetactl node set: %w: %s", n.Index, err, out)
		}
	}
	n1, n2 := c.Nodes[0], c.Nodes[1]
	client, err := n1.AddPod(dm.ctx, testbed.PodSpec{Namespace: "shop", Name: "frontend-remote"})
	if err != nil {
		return err
	}
	api, err := n2.AddPod(dm.ctx, testbed.PodSpec{Namespace: "payments", Name: "api"})
	if err != nil {
		return err
	}
	l, err := api.ListenTCP(8443)
	if err != nil {
		return err
	}
	echo := testbed.ServeTCPEcho(l)
	defer echo.Close()
	conn, err := client.DialTCP(dm.ctx, netip.AddrPortFrom(api.IPv4, 8443))
	if err != nil {
		return err
	}
	defer conn.Close()
	if err := testbed.EchoRoundTrip(conn, []byte("charge"), echoWait); err != nil {
		return err
	}
	src := unmapped(conn.LocalAddr())
	fmt.Fprintf(dm.out, "\n  shop/frontend-remote (node-1, %s) connected to payments/api (node-2, %s:8443).\n", src.Addr(), api.IPv4)
	fmt.Fprintln(dm.out, "  Node 1 put the pktmeta TCP option on the SYN as it left; node 2 checked its MAC, made a")
	fmt.Fprintln(dm.out, "  remote record and removed the option before the pod saw it. Node 2's answer:")
	fmt.Fprintln(dm.out)
	out, err := ctl(n2, "lookup", "--proto", "tcp", "--src", src.String(), "--dst", netip.AddrPortFrom(api.IPv4, 8443).String())
	if err != nil {
		return fmt.Errorf("lookup on node 2: %w: %s", err, out)
	}
	for _, line := range strings.Split(strings.TrimRight(out, "\n"), "\n") {
		fmt.Fprintln(dm.out, "    "+line)
	}
	out, err = ctl(n1, "lookup", "--proto", "tcp", "--src", src.String(), "--dst", netip.AddrPortFrom(api.IPv4, 8443).String(), "-o", "json")
	if err != nil {
		return fmt.Errorf("lookup on node 1: %w: %s", err, out)
	}
	var local struct {
		ConnID uint64 `json:"connID"`
	}
	json.Unmarshal([]byte(out), &local)
	fmt.Fprintf(dm.out, "\n  Node 1's own record of it has conn id %d (%d in the option's 44 bits).\n", local.ConnID, local.ConnID&datapath.ConnOriginMask)
	st, err := ctl(n2, "node", "show", "-o", "json")
	if err != nil {
		return fmt.Errorf("node show: %w: %s", err, st)
	}
	var ns struct {
		Stats datapath.RemoteStats `json:"stats"`
	}
	json.Unmarshal([]byte(st), &ns)
	fmt.Fprintf(dm.out, "  Node 2's uplink counters: SYNs in %d, with the option %d, remote records %d, untrusted %d, bad MAC %d.\n",
		ns.Stats.InSYNs, ns.Stats.InOptions, ns.Stats.RemoteTagged, ns.Stats.Untrusted, ns.Stats.BadMAC)
	return nil
}
