package testbed

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/vishvananda/netlink"
)

// ErrClosed is returned by the methods of a Node that was closed.
var ErrClosed = errors.New("testbed: node closed")

// cleanupTimeout bounds the CNI DELs that clean up after a failure or in
// Close, which must not inherit a caller's context that may be done.
const cleanupTimeout = 60 * time.Second

// Config describes a node. The zero value of every field but CNIPath is
// usable.
type Config struct {
	// CNIPath lists the directories searched for plugin binaries, e.g.
	// {"/work/main/bin/cni", "/work/main/bin"}.
	CNIPath []string
	// CNIVersion is the conflist's cniVersion; default "1.0.0".
	CNIVersion string
	// Subnet4 is the host-local IPv4 range for pods; default "10.244.1.0/24".
	Subnet4 string
	// Subnet6 is the host-local IPv6 range, e.g. "fd00:10:244:1::/64";
	// empty means IPv4 only.
	Subnet6 string
	// Chain holds the plugin configs appended after ptp in the conflist, in
	// order, e.g. {"type": "bandwidth", ...} then {"type": "pktmeta", ...}.
	// Empty means ptp only.
	Chain []map[string]any
	// NetworkName is the conflist's name; default "pmtb".
	NetworkName string
	// PluginStderr receives what plugins write to stderr; default os.Stderr.
	PluginStderr io.Writer
	// NoDAD turns IPv6 duplicate address detection off in the node and pod
	// namespaces, as some CNI plugins do in pods. It makes AddPod about a
	// second faster with Subnet6, since ptp then has no tentative address
	// to wait for.
	NoDAD bool
	// MTU of the pods' veths (ptp's "mtu"); 0: the kernel's default.
	MTU int
}

// Node is a network namespace standing in for a Kubernetes node. Its methods
// are safe for concurrent use, except Close.
type Node struct {
	// ID prefixes every name the node creates: "pmtb-<pid>-<random>".
	ID string
	// NetnsPath is the bind-mounted node network namespace.
	NetnsPath string

	cfg    Config
	tmpDir string // libcni cache and host-local state
	cni    *libcni.CNIConfig

	mu       sync.Mutex
	closed   bool
	conf     *libcni.NetworkConfigList
	pods     map[string]*Pod // by container ID; those Close must clean up
	podSeq   int
	services []Service
	nftTable bool        // the services table exists in the node netns
	closers  []io.Closer // sockets opened through Pod helpers
}

// NewNode creates the node namespace (lo up, IPv4 and IPv6 forwarding on),
// its temp dirs and its conflist. On error, whatever was created is removed.
func NewNode(cfg Config) (_ *Node, err error) {
	if len(cfg.CNIPath) == 0 {
		return nil, errors.New("new node: Config.CNIPath is empty")
	}
	if cfg.CNIVersion == "" {
		cfg.CNIVersion = "1.0.0"
	}
	if cfg.Subnet4 == "" {
		cfg.Subnet4 = "10.244.1.0/24"
	}
	if cfg.NetworkName == "" {
		cfg.NetworkName = "pmtb"
	}
	if cfg.PluginStderr == nil {
		cfg.PluginStderr = os.Stderr
	}
	if p, err := netip.ParsePrefix(cfg.Subnet4); err != nil || !p.Addr().Is4() {
		return nil, fmt.Errorf("new node: Subnet4 %q is not an IPv4 prefix", cfg.Subnet4)
	}
	if cfg.Subnet6 != "" {
		if p, err := netip.ParsePrefix(cfg.Subnet6); err != nil || !p.Addr().Is6() {
			return nil, fmt.Errorf("new node: Subnet6 %q is not an IPv6 prefix", cfg.Subnet6)
		}
	}

	id, err := newID()
	if err != nil {
		return nil, fmt.Errorf("new node: %w", err)
	}
	n := &Node{ID: id, cfg: cfg, pods: make(map[string]*Pod)}
	defer func() {
		if err != nil {
			err = errors.Join(err, n.Close())
		}
	}()

	if n.tmpDir, err = os.MkdirTemp("", id+"-"); err != nil {
		return nil, fmt.Errorf("new node: %w", err)
	}
	for _, d := range []string{"cache", "ipam"} {
		if err = os.Mkdir(filepath.Join(n.tmpDir, d), 0o700); err != nil {
			return nil, fmt.Errorf("new node: %w", err)
		}
	}
	// Its own exec so that plugin stderr goes where the caller wants it.
	pluginExec := &invoke.DefaultExec{
		RawExec:       &invoke.RawExec{Stderr: cfg.PluginStderr},
		PluginDecoder: version.PluginDecoder{},
	}
	n.cni = libcni.NewCNIConfigWithCacheDir(cfg.CNIPath, filepath.Join(n.tmpDir, "cache"), pluginExec)

	if n.conf, err = n.buildConfList(cfg.Chain); err != nil {
		return nil, fmt.Errorf("new node: %w", err)
	}

	path := filepath.Join(netnsDir, id+"-node")
	if err = newNetns(path); err != nil {
		return nil, fmt.Errorf("new node: %w", err)
	}
	n.NetnsPath = path
	err = n.Do(func() error {
		if err := linkUp("lo"); err != nil {
			return err
		}
		// ptp enables forwarding itself, but only for the families of the
		// pod it adds; services and tests should not depend on that.
		if err := writeSysctl("net/ipv4/ip_forward", "1"); err != nil {
			return err
		}
		if err := writeSysctl("net/ipv6/conf/all/forwarding", "1"); err != nil {
			return err
		}
		return n.setDAD()
	})
	if err != nil {
		return nil, fmt.Errorf("new node: setup netns: %w", err)
	}
	return n, nil
}

// Do runs fn on a locked OS thread in the node's network namespace.
// Programs started by fn run in that namespace too. fn runs on another
// goroutine, so it must report failures by returning them, not with
// t.Fatal, and a panic in it ends the test binary.
func (n *Node) Do(fn func() error) error {
	return inNetns(n.NetnsPath, fn)
}

// Run runs a program (nft, conntrack, ip, tc, bpftool...) in the node's
// network namespace and returns its stdout; the error carries its stderr.
func (n *Node) Run(ctx context.Context, name string, args ...string) ([]byte, error) {
	return runIn(ctx, n.NetnsPath, nil, name, args...)
}

// ConfList returns the conflist used for pods added from now on.
func (n *Node) ConfList() *libcni.NetworkConfigList {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.conf
}

// SetChain replaces the plugins chained after ptp for pods added from now
// on. Existing pods keep the conflist they were added with for CHECK and DEL.
func (n *Node) SetChain(chain []map[string]any) error {
	conf, err := n.buildConfList(chain)
	if err != nil {
		return fmt.Errorf("set chain: %w", err)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return ErrClosed
	}
	n.conf = conf
	return nil
}

func (n *Node) buildConfList(chain []map[string]any) (*libcni.NetworkConfigList, error) {
	ranges := []any{[]any{map[string]string{"subnet": n.cfg.Subnet4}}}
	routes := []any{map[string]string{"dst": "0.0.0.0/0"}}
	if n.cfg.Subnet6 != "" {
		ranges = append(ranges, []any{map[string]string{"subnet": n.cfg.Subnet6}})
		routes = append(routes, map[string]string{"dst": "::/0"})
	}
	ptp := map[string]any{
		"type":   "ptp",
		"ipMasq": false,
		"ipam": map[string]any{
			"type":    "host-local",
			"dataDir": filepath.Join(n.tmpDir, "ipam"),
			"ranges":  ranges,
			"routes":  routes,
		},
	}
	if n.cfg.MTU > 0 {
		ptp["mtu"] = n.cfg.MTU
	}
	plugins := []any{ptp}
	for i, p := range chain {
		if t, _ := p["type"].(string); t == "" {
			return nil, fmt.Errorf("chain[%d] has no type", i)
		}
		plugins = append(plugins, p)
	}
	raw, err := json.MarshalIndent(map[string]any{
		"cniVersion": n.cfg.CNIVersion,
		"name":       n.cfg.NetworkName,
		"plugins":    plugins,
	}, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("marshal conflist: %w", err)
	}
	conf, err := libcni.ConfListFromBytes(raw)
	if err != nil {
		return nil, fmt.Errorf("parse conflist: %w", err)
	}
	return conf, nil
}

// Close deletes the network of every pod still known (CNI DEL), the
// services, every namespace and the temp dir, carrying on past failures and
// returning them all. Sockets opened through Pod helpers are closed first,
// since they would keep their namespace alive. Later calls return nil.
// Close must not run concurrently with the node's other methods.
func (n *Node) Close() error {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return nil
	}
	n.closed = true
	closers, pods, nftTable := n.closers, n.pods, n.nftTable
	n.closers, n.pods, n.services = nil, nil, nil
	n.mu.Unlock()

	var errs []error
	for _, c := range closers {
		_ = c.Close() // most were closed by their users already
	}
	ctx, cancel := context.WithTimeout(context.Background(), cleanupTimeout)
	defer cancel()
	for _, p := range pods {
		if n.NetnsPath != "" {
			if err := n.delNetwork(ctx, p); err != nil {
				errs = append(errs, fmt.Errorf("del pod %s/%s: %w", p.Spec.Namespace, p.Spec.Name, err))
			}
		}
		errs = append(errs, removeNetns(p.NetnsPath))
	}
	// Deleted explicitly although it would go with the namespace: the
	// namespace outlives its mount while a socket in it is open.
	if nftTable {
		if _, err := runIn(ctx, n.NetnsPath, nil, "nft", "delete", "table", "inet", n.ID); err != nil {
			errs = append(errs, fmt.Errorf("delete services: %w", err))
		}
	}
	if n.NetnsPath != "" {
		errs = append(errs, removeNetns(n.NetnsPath))
	}
	if n.tmpDir != "" {
		if err := os.RemoveAll(n.tmpDir); err != nil {
			errs = append(errs, fmt.Errorf("remove temp dir: %w", err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("close node %s: %w", n.ID, err)
	}
	return nil
}

// track registers a socket for Close.
func (n *Node) track(c io.Closer) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		_ = c.Close()
		return
	}
	n.closers = append(n.closers, c)
}

// setDAD applies Config.NoDAD to the namespace of the calling thread. The
// default devconf is what matters: ptp creates both veth ends in the pod
// namespace, and a link moved to another namespace gets that namespace's
// defaults.
func (n *Node) setDAD() error {
	if !n.cfg.NoDAD {
		return nil
	}
	for _, conf := range []string{"all", "default"} {
		if err := writeSysctl("net/ipv6/conf/"+conf+"/accept_dad", "0"); err != nil {
			return err
		}
	}
	return nil
}

func linkUp(name string) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return fmt.Errorf("link %s: %w", name, err)
	}
	if err := netlink.LinkSetUp(l); err != nil {
		return fmt.Errorf("link %s up: %w", name, err)
	}
	return nil
}
