package plugin

import (
	"log/slog"
	"net/netip"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/utils"
	"github.com/pktmeta/pktmeta/internal/datapath"
)

// podIdentity is what the runtime tells us about the pod, through CNI_ARGS
// (kubelet/containerd: IgnoreUnknown=1;K8S_POD_NAMESPACE=...;...).
type podIdentity struct {
	Namespace string
	Name      string
	UID       string
}

// parseCNIArgs reads the K8S_* identity keys and ignores the rest, whatever
// IgnoreUnknown says: identity is optional, the attachment is not.
//
// It splits the way CNI's types.LoadArgs does: pairs at ';', each pair
// exactly one key and one value around a single '=', keys matched exactly
// (no trimming, no case folding). An identity key given twice, or with a
// value CNI itself would refuse (one holding another '='), is an error
// with code 7: a runtime never sends either, so it is someone trying to
// confuse who the pod is. Pairs of other keys are not ours to judge,
// K8S_POD_INFRA_CONTAINER_ID included: the workload's container id is
// CNI_CONTAINERID, which kubelet sets to the same sandbox id and which
// DEL, CHECK and GC name the attachment by.
func parseCNIArgs(args string) (podIdentity, error) {
	var id podIdentity
	if args == "" {
		return id, nil
	}
	seen := map[string]bool{}
	for _, pair := range strings.Split(args, ";") {
		k, v, ok := strings.Cut(pair, "=")
		if !ok {
			continue
		}
		var dst *string
		switch k {
		case "K8S_POD_NAMESPACE":
			dst = &id.Namespace
		case "K8S_POD_NAME":
			dst = &id.Name
		case "K8S_POD_UID":
			dst = &id.UID
		default:
			continue
		}
		if seen[k] {
			return podIdentity{}, configError("CNI_ARGS: duplicate key %q (a runtime passes each identity key once)", k)
		}
		seen[k] = true
		if strings.Contains(v, "=") {
			return podIdentity{}, configError("CNI_ARGS: key %q: value %q holds a '=' (CNI reads the pair as invalid)", k, v)
		}
		*dst = v
	}
	return id, nil
}

// partial: without a pod name the workload is known only by its container.
func (p podIdentity) partial() bool { return p.Namespace == "" || p.Name == "" }

// addInput is everything ADD learns from its invocation (environment and
// stdin) before it touches the system: nothing in it needed a namespace,
// a netlink socket or bpffs.
type addInput struct {
	prev          *current.Result
	id            podIdentity
	tags, podTags map[string]string
	addrs         []netip.Addr
	// workload is the pod's workload without its host side (host veth,
	// host netns), which only the system can tell.
	workload *datapath.Workload
}

// parseAddInput does every check of an ADD that needs only the invocation
// and the parsed config, so a bad invocation fails before any side effect:
// the environment as skel checks it (container id, ifname, netns), the
// prevResult, the pod's tags, CNI_ARGS, the workload's field sizes and
// strictSource's need for addresses. Its errors are CNI errors: code 7 for
// the config, CNI_ARGS and the prevResult, skel's codes for the environment.
func parseAddInput(conf *Config, args *skel.CmdArgs, log *slog.Logger) (*addInput, error) {
	if err := utils.ValidateContainerID(args.ContainerID); err != nil {
		return nil, err
	}
	if err := utils.ValidateInterfaceName(args.IfName); err != nil {
		return nil, err
	}
	if args.Netns == "" {
		return nil, types.NewError(types.ErrInvalidEnvironmentVariables, "required env variables [CNI_NETNS] missing", "")
	}
	if conf.PrevResult == nil {
		return nil, errNoPrevResult
	}
	prev, err := current.NewResultFromResult(conf.PrevResult)
	if err != nil {
		return nil, configError("key \"prevResult\": convert to %s: %v", current.ImplementedSpecVersion, err)
	}
	tags, podTags, err := conf.podTags(log)
	if err != nil {
		return nil, err
	}
	id, err := parseCNIArgs(args.Args)
	if err != nil {
		return nil, err
	}
	w := &datapath.Workload{
		Namespace:   id.Namespace,
		Pod:         id.Name,
		UID:         id.UID,
		ContainerID: args.ContainerID,
		IfName:      args.IfName,
		Netns:       args.Netns,
		Network:     conf.Name,
		Tags:        tags,
		PodTags:     podTags,
		Created:     time.Now(),
		Partial:     id.partial(),
	}
	if err := datapath.ValidateWorkload(w); err != nil {
		return nil, configError("%v", err)
	}
	addrs := podAddrs(prev, args.IfName)
	if conf.StrictSource && len(addrs) == 0 {
		return nil, configError("key \"strictSource\": prevResult has no IP addresses to allow")
	}
	if len(addrs) > datapath.MaxAddrs {
		return nil, configError("key \"prevResult\": the pod interface has %d addresses, at most %d are supported (each is a source it may open connections from)", len(addrs), datapath.MaxAddrs)
	}
	return &addInput{prev: prev, id: id, tags: tags, podTags: podTags, addrs: addrs, workload: w}, nil
}
