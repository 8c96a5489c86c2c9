package agent

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/pktmeta/pktmeta/internal/datapath"
	"github.com/pktmeta/pktmeta/plugin"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
)

// kubeClient returns a client for the Kubernetes API, or nil when there is
// none: the agent works without it (no label tags, no automatic uninstall,
// nothing carried across nodes).
func (a *Agent) kubeClient() kubernetes.Interface {
	var (
		cfg *rest.Config
		err error
	)
	switch {
	case a.cfg.Kubeconfig != "":
		cfg, err = clientcmd.BuildConfigFromFlags("", a.cfg.Kubeconfig)
	case os.Getenv("KUBERNETES_SERVICE_HOST") != "":
		cfg, err = rest.InClusterConfig()
	default:
		return nil
	}
	if err != nil {
		a.log.Warn("no Kubernetes API client; label tags, automatic uninstall and carrying origins across nodes are off", "err", err)
		return nil
	}
	cfg.UserAgent = "pktmeta-agent"
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		a.log.Warn("no Kubernetes API client; label tags, automatic uninstall and carrying origins across nodes are off", "err", err)
		return nil
	}
	return cs
}

// kubeLoop watches the pods of this node and copies the configured labels
// into their workloads' tags.
func (a *Agent) kubeLoop(ctx context.Context) {
	a.mu.Lock()
	cs := a.kube
	a.mu.Unlock()
	if cs == nil {
		return
	}
	if a.cfg.NodeName == "" {
		a.log.Warn("label tags need the node name (--node-name or NODE_NAME); off")
		return
	}
	lw := cache.NewListWatchFromClient(cs.CoreV1().RESTClient(), "pods", metav1.NamespaceAll,
		fields.OneTermEqualSelector("spec.nodeName", a.cfg.NodeName))
	_, ctrl := cache.NewInformerWithOptions(cache.InformerOptions{
		ListerWatcher: lw,
		ObjectType:    &corev1.Pod{},
		ResyncPeriod:  5 * time.Minute,
		Handler: cache.ResourceEventHandlerFuncs{
			AddFunc:    func(obj any) { a.applyLabels(a.cfg.Plugin.PinPath, obj) },
			UpdateFunc: func(_, obj any) { a.applyLabels(a.cfg.Plugin.PinPath, obj) },
		},
	})
	ctrl.RunWithContext(ctx)
}

// applyLabels adds the pod's configured labels to its workloads' tags.
// Static tags and pktmeta.dev/ annotations come first; labels only add
// keys not set yet.
func (a *Agent) applyLabels(pinPath string, obj any) {
	pod, ok := obj.(*corev1.Pod)
	if !ok || pod.Spec.HostNetwork {
		return
	}
	d, err := datapath.OpenExisting(pinPath, a.log)
	if err != nil {
		a.log.Warn("label tags", "err", err)
		return
	}
	defer d.Close()
	all, err := d.Workloads()
	if err != nil {
		a.log.Warn("label tags", "err", err)
		return
	}
	for _, w := range all {
		if w.Namespace != pod.Namespace || w.Pod != pod.Name || (w.UID != "" && w.UID != string(pod.UID)) {
			continue
		}
		tags, podTags, err := plugin.MergeTags(a.cfg.Plugin.Tags, pod.Annotations, a.cfg.Plugin.AllowedPodTags, a.log)
		if err != nil {
			a.log.Warn("label tags", "pod", pod.Namespace+"/"+pod.Name, "err", err)
			continue
		}
		// Labels are set by whoever writes the pod, like annotations: the
		// pod's claims, not the operator's.
		for _, key := range a.cfg.LabelTags {
			v, ok := pod.Labels[key]
			if !ok {
				continue
			}
			if _, set := tags[key]; set {
				continue
			}
			if _, set := podTags[key]; set {
				continue
			}
			if err := plugin.ValidateTag(key, v); err != nil || len(tags)+len(podTags) >= datapath.MaxTags {
				a.log.Warn("pod label does not fit as a tag", "pod", pod.Namespace+"/"+pod.Name, "label", key, "err", err)
				continue
			}
			podTags[key] = v
		}
		uid := string(pod.UID)
		err = d.ModifyWorkload(w.Key(), func(cur *datapath.Workload) bool {
			if cur.ID != w.ID || (sameTags(tags, cur.Tags) && sameTags(podTags, cur.PodTags) && cur.UID == uid) {
				return false
			}
			cur.Tags, cur.PodTags, cur.UID = tags, podTags, uid
			return true
		})
		if err != nil {
			a.log.Warn("label tags", "workload", w.ID, "err", err)
		}
	}
}

func sameTags(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// daemonSetGoing reports whether the agent's own DaemonSet is being
// deleted, which is the only case "auto" uninstalls in. A rolling update
// replaces the pod but the DaemonSet stays.
func (a *Agent) daemonSetGoing(ctx context.Context) (bool, error) {
	a.mu.Lock()
	cs := a.kube
	a.mu.Unlock()
	if cs == nil {
		return false, fmt.Errorf("no Kubernetes API")
	}
	if a.cfg.PodName == "" || a.cfg.PodNamespace == "" {
		return false, fmt.Errorf("pod name and namespace unknown (POD_NAME, POD_NAMESPACE)")
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	pod, err := cs.CoreV1().Pods(a.cfg.PodNamespace).Get(ctx, a.cfg.PodName, metav1.GetOptions{})
	if err != nil {
		return false, fmt.Errorf("get own pod: %w", err)
	}
	for _, ref := range pod.OwnerReferences {
		if ref.Kind != "DaemonSet" {
			continue
		}
		ds, err := cs.AppsV1().DaemonSets(a.cfg.PodNamespace).Get(ctx, ref.Name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return true, nil
		}
		if err != nil {
			return false, fmt.Errorf("get DaemonSet %s: %w", ref.Name, err)
		}
		return ds.DeletionTimestamp != nil || ds.UID != ref.UID, nil
	}
	return false, fmt.Errorf("own pod has no DaemonSet owner")
}
