# csi-snap node plugin image. Build from the repository root, with the
# version GetPluginInfo reports (the chart's appVersion for a release):
#   docker build --build-arg VERSION=0.2.0 -t csi-snap:0.2.0 .
# hack/verify-chart.sh builds the binary exactly as the first stage does.

FROM golang:1.26 AS build
WORKDIR /src
# Module downloads get their own layer, reused until go.mod/go.sum change.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
# Static (no cgo): the runtime stage has no Go toolchain or libc pinning.
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/csi-snap ./cmd/csi-snap

FROM debian:12-slim
# mkfs/fsck/resize of ext4 (e2fsprogs) and xfs (xfsprogs); blkid, mount and
# losetup (util-linux, mount) for formatting and mounting volumes.
RUN apt-get update \
 && apt-get install -y --no-install-recommends e2fsprogs xfsprogs util-linux mount \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/csi-snap /usr/local/bin/csi-snap
ENTRYPOINT ["/usr/local/bin/csi-snap"]
