// Package crihost runs a private containerd with its CRI plugin for tests,
// so that a real container runtime, not our code, creates pod sandboxes
// and invokes the CNI chain, as kubelet + containerd do on a node. It needs
// root; nothing it does touches a system containerd, /etc/cni/net.d,
// /opt/cni/bin or /sys/fs/bpf/pktmeta.
//
// # Pieces
//
//   - [EnsureTools] installs containerd and runc (apt) and crictl (go
//     install into <repo>/bin/tools) when missing; install-tools.sh does the
//     same for a Makefile target.
//   - [BuildTestImages] compiles two static programs and writes them as
//     single-layer images: [PauseImage] (the sandbox image: waits for
//     SIGTERM, reaps zombies) and [NetutilImage] (`netutil serve` echo
//     servers, `netutil connect` one round trip, JSON lines on stdout). Their
//     sources are in testdata/images, embedded. There is no registry: images
//     are docker-archive tarballs imported with `ctr images import`.
//     [WriteImage] makes such an image from any host files (a node agent).
//   - [Start] runs containerd; [Host] has crictl-based helpers: [Host.RunPod],
//     [Host.CreateContainer], [Host.RunContainer], [Host.Exec], [Host.Logs],
//     [Host.StopPod], [Host.RemovePod], and [Host.Crictl] for the rest.
//   - [Host.Close] and [CleanupStale] remove everything again.
//
// A typical test:
//
//	tools, err := crihost.EnsureTools(ctx)            // fail, don't skip, without it
//	imgs, err := crihost.BuildTestImages(ctx, t.TempDir())
//	h, err := crihost.Start(ctx, crihost.Options{Tools: tools, CNIBinDir: bin, Images: imgs.All()})
//	t.Cleanup(func() { h.Close() })
//	os.WriteFile(filepath.Join(h.CNIConfDir(), "10-net.conflist"), conflist, 0o644)
//	srv, err := h.RunPod(ctx, crihost.PodSpec{Name: "server", Namespace: "shop"})
//	id, err := h.RunContainer(ctx, srv, crihost.ContainerSpec{Name: "server",
//		Image: crihost.NetutilImage, Args: []string{"serve", "--tcp", ":8080"}})
//
// # The private containerd
//
// Everything lives in one directory, $TMPDIR/pmcri-<pid>-<n> ([Host.Dir],
// its base name is [Host.ID]): config.toml, root, state, the gRPC and ttrpc
// sockets, runc's state root, the opt plugin's directory, pod log
// directories, crictl.yaml, and by default the CNI bin and conf
// directories and the pods' network namespaces. The directory is bind-
// mounted onto itself and made a shared mount, because the CRI plugin
// refuses HostToContainer and Bidirectional mounts from a private mount and
// / is private here; [Host.MkdirShared] and [Host.NetnsDir] are paths a
// node agent container can mount with [PropagationHostToContainer]. The
// config is in config.go; the CRI plugin gets sandbox_image = PauseImage,
// restrict_oom_score_adj (no CAP_SYS_RESOURCE), disable_tcp_service,
// disable_apparmor, netns_mounts_under_state_dir, max_conf_num = 1, runc
// with the cgroupfs driver, and overlayfs when an overlay mount works
// (else native). Pods get the cgroup parent /<ID>.
//
// containerd runs under a tiny subreaper (testdata/reaper): its shims
// daemonize and would otherwise become children, and on exit zombies, of
// PID 1, which in a sandbox need not reap them.
//
// # What is left outside the directory, and cleanup
//
// containerd 1.6 still writes three things outside it: each sandbox's
// shim socket /run/containerd/s/<sha256(socket/k8s.io/sandbox id)>,
// libcni's result cache /var/lib/cni/results/<net>-<sandbox id>-<ifname>
// (containerd 1.6 cannot move it), and, with Options.SystemNetnsDir,
// /var/run/netns/cni-<uuid>. ptp also switches on net.ipv4.ip_forward in
// the host's network namespace. Sandbox ids are appended to
// sandboxes.jsonl as pods are created, so [Host.Close] (normally) and
// [CleanupStale] (after a killed test: directories whose flock nobody
// holds) find all of it: they remove pods through the CRI when containerd
// still answers (CNI DEL), stop containerd, kill what is left (processes
// in the /<ID> cgroups, processes naming the directory, the reaper last),
// unmount everything under the directory, remove the cgroups, the outside
// files and the outside directories the host created, restore
// ip_forward when no other host runs, and delete the directory.
// [Host.Leftovers] lists whatever still exists.
//
// # containerd 1.6 notes
//
//   - A conflist must say cniVersion 1.0.0 (or lower): containerd 1.6's
//     libcni does not accept 1.1.0 results.
//   - containerd adds a loopback network of its own ("cni-loopback"): the
//     CNI bin dir needs the loopback plugin.
//   - The CRI passes pod annotations to plugins that declare the
//     io.kubernetes.cri.pod-annotations capability, all of them, and
//     CNI_ARGS K8S_POD_NAMESPACE, K8S_POD_NAME, K8S_POD_INFRA_CONTAINER_ID
//     (= sandbox id) and K8S_POD_UID.
//   - crictl stops parsing flags at the first argument (`inspectp -o json
//     ID`, not `inspectp ID -o json`); cri-api v0.37 made env values bytes,
//     so crictl's JSON wants them base64 (containerConfig handles it).
//   - Images imported with ctr reach the CRI's image list through events, a
//     moment later: [Host.ImportImage] waits for `crictl inspecti`.
package crihost
