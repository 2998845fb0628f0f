//go:build tools

// Package hack pins the modules the project builds with, so that go.mod and
// go.sum list them before the code that imports them lands. It is never built.
package hack

import (
	_ "github.com/container-storage-interface/spec/lib/go/csi"
	_ "github.com/freddierice/go-losetup"
	_ "github.com/kubernetes-csi/csi-test/v5/pkg/sanity"
	_ "github.com/prometheus/client_golang/prometheus"
	_ "golang.org/x/sys/unix"
	_ "google.golang.org/grpc"
	_ "k8s.io/klog/v2"
)
