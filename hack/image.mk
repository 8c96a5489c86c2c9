# Container image and the kind end-to-end test. Included from the Makefile;
# usable alone too: make -f hack/image.mk image
#
#   make image      bin/pktmeta-image.tar, a docker-archive tarball tagged
#                   $(IMAGE_REPO):$(IMAGE_VERSION), built without Docker
#                   (hack/mkimage). Load it with
#                     ctr -n k8s.io images import bin/pktmeta-image.tar
#                     kind load image-archive bin/pktmeta-image.tar
#                     docker load -i bin/pktmeta-image.tar
#   make e2e-kind   e2e/kind/run.sh: the e2e/k8s suite (the one make
#                   e2e-k8s runs) against a one-node kind cluster. Needs
#                   Docker and kind; without them it says so and exits 0.
#
# The image is reproducible: same commit, same IMAGE_VERSION and the same Go
# toolchain give the same digest. Every timestamp in it is SOURCE_DATE_EPOCH
# (default: the HEAD commit's time; 0 outside git).

GO ?= go
BIN ?= $(CURDIR)/bin
IMAGE_REPO ?= ghcr.io/pktmeta/pktmeta
IMAGE_VERSION ?= dev
# amd64 or arm64; GOARCH=arm64 make image builds an arm64 image.
IMAGE_ARCH ?= $(shell $(GO) env GOARCH)
IMAGE_TAR ?= $(BIN)/pktmeta-image.tar
IMAGE_ROOT := $(BIN)/image-root/linux-$(IMAGE_ARCH)
# -trimpath and -buildid= keep paths and build ids out of the binaries, and
# -buildvcs=false the state of the work tree (the commit is in the image's
# revision label instead): the same sources give the same bytes, whatever
# GOFLAGS says. The Dockerfile builds the same way.
# IMAGE_VERSION is also the binaries' version (internal/version), which the
# agent logs and exports as pktmeta_build_info.
IMAGE_GO_FLAGS = -trimpath -buildvcs=false -ldflags "-s -w -buildid= -X github.com/pktmeta/pktmeta/internal/version.Version=$(IMAGE_VERSION)"
# The binaries in the image and where they come from.
IMAGE_CMDS := pktmeta-agent pktmetactl pktmeta

.PHONY: image e2e-kind

image:
	@mkdir -p $(IMAGE_ROOT)
	@set -e; for c in $(IMAGE_CMDS); do \
		echo "go build ./cmd/$$c (linux/$(IMAGE_ARCH))"; \
		CGO_ENABLED=0 GOOS=linux GOARCH=$(IMAGE_ARCH) $(GO) build $(IMAGE_GO_FLAGS) -o $(IMAGE_ROOT)/$$c ./cmd/$$c; \
	done
	@# mkimage itself runs here, whatever IMAGE_ARCH is.
	GOOS= GOARCH= $(GO) run ./hack/mkimage \
		--agent $(IMAGE_ROOT)/pktmeta-agent \
		--ctl $(IMAGE_ROOT)/pktmetactl \
		--plugin $(IMAGE_ROOT)/pktmeta \
		--arch $(IMAGE_ARCH) \
		--repository $(IMAGE_REPO) \
		--version $(IMAGE_VERSION) \
		--output $(IMAGE_TAR)

# run.sh checks for Docker and kind first and builds the images itself
# only when it can go on.
e2e-kind:
	MAKE="$(MAKE)" ./e2e/kind/run.sh
