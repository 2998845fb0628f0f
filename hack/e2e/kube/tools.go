//go:build tools

// Package kube pins the Kubernetes control-plane binaries hack/e2e.sh builds.
// It is a separate module so the project's own go.mod stays free of them.
package kube

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
