# syntax=docker/dockerfile:1
# pktmeta's image for people with Docker (docker build -t ghcr.io/pktmeta/pktmeta:dev .).
# Without Docker, `make image` builds the same layout with hack/mkimage:
#
#   /usr/local/bin/pktmeta-agent   entrypoint, cmd ["run"]
#   /usr/local/bin/pktmetactl      the CLI
#   /opt/pktmeta/bin/pktmeta       the CNI plugin the agent copies to the host
#   /usr/local/bin/pktmeta         a symlink to it (install/uninstall's default)
#   /etc/passwd, /etc/group        root and nobody
#   /tmp                           1777
#
# The BPF objects are committed (internal/datapath/*.o): no clang needed.
# Multi-platform: docker buildx build --platform linux/amd64,linux/arm64 .

ARG GO_VERSION=1.26.8

FROM --platform=$BUILDPLATFORM golang:${GO_VERSION}-bookworm AS build
WORKDIR /src
ENV CGO_ENABLED=0 GOFLAGS=-buildvcs=false
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod go mod download
COPY . .
ARG TARGETOS=linux
ARG TARGETARCH
ARG VERSION=dev
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    set -eu; \
    for c in pktmeta-agent pktmetactl; do \
        GOOS=$TARGETOS GOARCH=$TARGETARCH go build -trimpath -ldflags "-s -w -buildid= -X github.com/pktmeta/pktmeta/internal/version.Version=$VERSION" -o /out/usr/local/bin/$c ./cmd/$c; \
    done; \
    GOOS=$TARGETOS GOARCH=$TARGETARCH go build -trimpath -ldflags "-s -w -buildid= -X github.com/pktmeta/pktmeta/internal/version.Version=$VERSION" -o /out/opt/pktmeta/bin/pktmeta ./cmd/pktmeta; \
    mkdir -p /out/etc /out/tmp; \
    chmod 1777 /out/tmp; \
    printf 'root:x:0:0:root:/:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n' >/out/etc/passwd; \
    printf 'root:x:0:\nnobody:x:65534:\n' >/out/etc/group; \
    chmod 0644 /out/etc/passwd /out/etc/group; \
    chmod 0755 /out/usr/local/bin/pktmeta-agent /out/usr/local/bin/pktmetactl /out/opt/pktmeta/bin/pktmeta; \
    ln -s /opt/pktmeta/bin/pktmeta /out/usr/local/bin/pktmeta

FROM scratch
ARG VERSION=dev
ARG REVISION=
COPY --from=build /out/ /
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
WORKDIR /
LABEL org.opencontainers.image.title="pktmeta" \
      org.opencontainers.image.description="pktmeta node agent, pktmetactl and the pktmeta chained CNI plugin" \
      org.opencontainers.image.source="https://github.com/pktmeta/pktmeta" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
ENTRYPOINT ["/usr/local/bin/pktmeta-agent"]
CMD ["run"]
