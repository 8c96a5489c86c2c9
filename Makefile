# pktmeta — build, test and demo entry points. See README.md.
SHELL := /usr/bin/env bash
GO ?= go
CLANG ?= clang-19
STRIP ?= llvm-strip-19
CNI_PLUGINS_VERSION := v1.10.0
CNI_PLUGINS := ptp host-local bandwidth loopback portmap
BIN := $(CURDIR)/bin
CNI_BIN := $(BIN)/cni
GO_SOURCES := $(shell find . -name '*.go' -not -path './bin/*') go.mod go.sum $(wildcard internal/datapath/*.o)

export CGO_ENABLED := 0

# make image (bin/pktmeta-image.tar, without Docker) and make e2e-kind.
include hack/image.mk

.PHONY: all deps build generate check-generate cni-plugins cri-tools test test-go e2e-k8s test-kernels demo bench bench-quick vet fmt-check fuzz clean

all: build

deps:
	./hack/deps.sh

build: $(BIN)/pktmeta $(BIN)/pktmetactl $(BIN)/pktmeta-demo $(BIN)/pktmeta-agent

$(BIN)/%: $(GO_SOURCES)
	$(GO) build -trimpath -o $@ ./cmd/$*

# Regenerates the committed bpf2go output (Go bindings and BPF objects) with
# the pinned compiler. The result is byte-for-byte reproducible.
generate:
	./hack/deps.sh
	$(GO) generate ./internal/datapath/... ./examples/... ./bench/...

# Regenerates into a copy of the tree and compares with what is committed.
check-generate:
	./hack/deps.sh
	./hack/check-generate.sh

# The CNI reference plugins, built from the module proxy (never committed).
cni-plugins: $(addprefix $(CNI_BIN)/,$(CNI_PLUGINS))

$(CNI_BIN)/%:
	mkdir -p $(CNI_BIN)
	GOBIN=$(CNI_BIN) $(GO) install github.com/containernetworking/plugins/plugins/$(if $(filter host-local,$*),ipam,$(if $(filter bandwidth portmap,$*),meta,main))/$*@$(CNI_PLUGINS_VERSION)

# containerd + runc (apt) and crictl (module proxy) for the CRI e2e tests.
cri-tools:
	./internal/crihost/install-tools.sh

vet:
	$(GO) vet ./...

fmt-check:
	@out=$$(gofmt -l $$(find . -name '*.go' -not -path './bin/*')); \
	if [[ -n "$$out" ]]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

# Every test: the Go tests (root, netns, BPF, a private containerd), then
# e2e-k8s (a real single-node Kubernetes). Both under the host lock, so
# that no other make test or e2e-k8s shares the machine's CNI directories,
# containerd socket and ports with them meanwhile.
test: deps build cni-plugins cri-tools fmt-check vet check-generate
	./hack/hostlock.sh "make test" $(MAKE) --no-print-directory test-go e2e-k8s test-kernels

# The Go tests alone (e2e/k8s skips: it needs the cluster e2e-k8s makes).
test-go:
	./hack/hostlock.sh "make test-go" env PKTMETA_BIN=$(BIN) PKTMETA_CNI_BIN=$(CNI_BIN) $(GO) test -count=1 -timeout 30m ./...

# A real single-node Kubernetes on this machine (etcd, kube-apiserver,
# controller-manager, scheduler, kubelet, kube-proxy in nftables mode,
# Debian's containerd), deploy/ applied with kubectl apply -k, and the Go
# suite in e2e/k8s against it; torn down on every exit, host restored. The
# first run builds Kubernetes from the module proxy (13-25 min on 2 cores,
# cached in /var/cache/pktmeta-e2e); later runs take about 5 minutes.
# It takes the host lock: never at the same time as make test's tests.
e2e-k8s:
	./hack/hostlock.sh "make e2e-k8s" ./e2e/k8s/node/run.sh

# The kernel matrix (e2e/kernels/matrix.tsv: Debian's 5.10, 6.1 and
# 6.12, Ubuntu 22.04's 5.15), each booted under qemu (TCG) with this
# host's userland, running e2e/kernels/suite.tsv; the host's own kernel
# runs the same suite natively. One line per kernel. Kernels are cached in
# /var/cache/pktmeta-kernels. KERNELS="6.1" picks kernels, KERNEL_RUN=re
# suite entries. Under the host lock: the native part uses netns and veths.
test-kernels: deps build cni-plugins
	./hack/hostlock.sh "make test-kernels" ./e2e/kernels/run.sh

# Go native fuzzing of what the CNI plugin reads before it touches the
# system (config on stdin, CNI_ARGS and the other CNI_* variables), each
# target for FUZZTIME, one after another: go test -fuzz takes one target per
# run. A failing input lands in plugin/testdata/fuzz/<target>/ and becomes
# a seed that plain go test runs. Go 1.26's coordinator can stop with
# "context deadline exceeded" at the end of FUZZTIME without any failing
# input (golang/go#75804, fixed in Go 1.27); that alone is not a finding.
FUZZTIME ?= 60s
FUZZ_TARGETS := FuzzParseConfig FuzzCNIStdinEnv

fuzz:
	@set -o pipefail; mkdir -p $(BIN); for t in $(FUZZ_TARGETS); do \
		echo "== $$t ($(FUZZTIME))"; \
		dir=plugin/testdata/fuzz/$$t; before=$$(ls $$dir 2>/dev/null | wc -l); \
		if $(GO) test ./plugin/ -run '^$$' -fuzz "^$$t$$" -fuzztime $(FUZZTIME) 2>&1 | tee $(BIN)/fuzz.log; then continue; fi; \
		if [[ $$(ls $$dir 2>/dev/null | wc -l) == "$$before" ]] && grep -q 'context deadline exceeded' $(BIN)/fuzz.log; then \
			echo "$$t: stopped by golang/go#75804 with no failing input; not a finding"; continue; \
		fi; \
		exit 1; \
	done

# A local "node" made of network namespaces, the real CNI chain, traffic
# through a DNATed service, and the metadata the destination found.
demo: deps build cni-plugins
	$(BIN)/pktmeta-demo --cni-path $(CNI_BIN):$(BIN)

# What pktmeta costs, next to the alternatives, in one run on this machine:
# tables on stdout, figures in bench/results/latest.json. Not tests: nothing
# in make test depends on timing. See docs/BENCHMARKS.md.
# Then the per-packet figures again on Debian 12's 6.1 under qemu TCG, as
# ratios to that run's floor only (bench/results/kernel-6.1-per-packet.json).
bench: deps build cni-plugins
	$(GO) run ./bench --cni-path $(CNI_BIN):$(BIN) --out bench/results/latest.json
	KERNELS=6.1 KERNEL_NATIVE=0 KERNEL_SUITE=e2e/kernels/bench.tsv KERNEL_OUT=bench/results ./e2e/kernels/run.sh

bench-quick: deps build cni-plugins
	$(GO) run ./bench --quick --cni-path $(CNI_BIN):$(BIN) --out bench/results/quick.json

clean:
	rm -rf $(BIN)
