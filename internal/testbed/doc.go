// Package testbed builds a throw-away Kubernetes-like node out of network
// namespaces and wires pods into it with the real CNI reference plugins,
// invoked through libcni exactly as a container runtime does. It needs root.
//
// # Topology
//
// A [Node] is its own network namespace, never the root one, so nothing the
// tests send can leave the machine. Every [Pod] is another namespace whose
// eth0 is the container end of a ptp veth pair; the host end lives in the
// node namespace, where the pod's /32 and /128 routes point at it. Pods reach
// each other through the node (ip_forward is on for IPv4 and IPv6 there), and
// [Node.AddService] adds kube-proxy-style nftables DNAT in the node namespace.
//
// The conflist is always ptp (ipMasq off) with host-local IPAM, followed by
// Config.Chain (for example bandwidth, then pktmeta):
//
//	{"cniVersion": "1.0.0", "name": "pmtb", "plugins": [
//	  {"type": "ptp", "ipMasq": false, "ipam": {"type": "host-local",
//	    "dataDir": "<node tmp>/ipam", "ranges": [...], "routes": [...]}},
//	  <Config.Chain...>]}
//
// # Namespaces without mount namespaces
//
// `ip netns exec` unshares the mount namespace and remounts /sys, which hides
// /sys/fs/bpf, where pktmeta pins its maps. The testbed therefore only ever
// switches the network namespace of one locked OS thread ([Node.Do],
// [Pod.Do]) and starts every external program (CNI plugins through libcni,
// nft, conntrack) from such a thread: a child forked from it inherits the
// thread's network namespace and the process's mount namespace. One
// consequence: /sys/class/net still shows the root namespace's links there
// (sysfs belongs to the namespace that mounted it); use netlink or
// /proc/net, which follow the calling thread.
//
// # Names and cleanup
//
// Everything a node creates carries its ID, "pmtb-<pid>-<random>": the
// namespaces are bind-mounted at /run/netns/<ID>-node and
// /run/netns/<ID>-p<N>-<pod name> (visible to `ip -n`, like `ip netns add`),
// the temp dir holding the libcni cache and the host-local state is
// $TMPDIR/<ID>-*, and the nftables table in the node namespace is inet <ID>.
// Veths, ifbs and qdiscs live inside those namespaces and go away with them.
// [Node.Close] is best effort and idempotent: it deletes the pods' networks
// (CNI DEL), the services, the namespaces and the temp dir, collecting every
// error. [CleanupStale] removes what a killed test process left behind.
//
// # API
//
//	func NewNode(cfg Config) (*Node, error)
//	func (n *Node) Close() error
//	func (n *Node) Do(fn func() error) error
//	func (n *Node) Run(ctx context.Context, name string, args ...string) ([]byte, error)
//	func (n *Node) ConfList() *libcni.NetworkConfigList
//	func (n *Node) SetChain(chain []map[string]any) error
//	func (n *Node) AddPod(ctx context.Context, spec PodSpec) (*Pod, error)
//	func (n *Node) DelPod(ctx context.Context, p *Pod) error
//	func (n *Node) DelPodNetwork(ctx context.Context, p *Pod) error
//	func (n *Node) RemovePodNetns(p *Pod) error
//	func (n *Node) CheckPod(ctx context.Context, p *Pod) error
//	func (n *Node) GC(ctx context.Context, keep []*Pod) error
//	func (n *Node) Status(ctx context.Context) error
//	func (n *Node) ExecPlugin(ctx context.Context, plugin, command string, p *Pod, stdin []byte, extraEnv []string) ([]byte, error)
//	func (n *Node) AddService(s Service) error
//	func (n *Node) DelService(s Service) error
//	func (s *EchoServer) Close() error
//	func (p *Pod) Do(fn func() error) error
//	func (p *Pod) Run(ctx context.Context, name string, args ...string) ([]byte, error)
//	func (p *Pod) ListenTCP(port int) (net.Listener, error)
//	func (p *Pod) ListenUDP(port int) (*net.UDPConn, error)
//	func (p *Pod) DialTCP(ctx context.Context, addr netip.AddrPort) (net.Conn, error)
//	func (p *Pod) DialUDP(addr netip.AddrPort) (*net.UDPConn, error)
//	func ServeTCPEcho(l net.Listener) *EchoServer
//	func ServeUDPEcho(c net.PacketConn) *EchoServer
//	func EchoRoundTrip(c net.Conn, payload []byte, timeout time.Duration) error
//	func CleanupStale() error
//
// A typical test:
//
//	n, err := testbed.NewNode(testbed.Config{CNIPath: []string{"/work/main/bin/cni"}, Subnet6: "fd00:10:244:1::/64"})
//	if err != nil { t.Fatal(err) }
//	t.Cleanup(func() { _ = n.Close() })
//	a, _ := n.AddPod(ctx, testbed.PodSpec{Namespace: "default", Name: "a"})
//	b, _ := n.AddPod(ctx, testbed.PodSpec{Namespace: "default", Name: "b"})
//	l, _ := b.ListenTCP(8080)
//	defer testbed.ServeTCPEcho(l).Close()
//	c, _ := a.DialTCP(ctx, netip.AddrPortFrom(b.IPv4, 8080))
//	err = testbed.EchoRoundTrip(c, []byte("hi"), 5*time.Second)
//
// # IPv6 and DAD
//
// By default the namespaces keep the kernel's IPv6 duplicate address
// detection. ptp waits for it on the pod side, and AddPod also waits for the
// gateway address on the host veth (else the node ignores the pod's first
// neighbour solicitations and its first IPv6 packets stall for a second or
// two), so a dual-stack AddPod takes about 3 s. Config.NoDAD turns DAD off
// in the node and pods and brings that down to tens of milliseconds.
//
// # CNI version notes
//
// libcni only sends GC and STATUS to plugins when the conflist's cniVersion
// is at least 1.1.0. With the default 1.0.0, [Node.GC] still deletes cached
// attachments that are not in keep (a CNI DEL each), and [Node.Status] does
// nothing; set Config.CNIVersion to "1.1.0" to exercise the plugins' GC and
// STATUS commands.
package testbed
