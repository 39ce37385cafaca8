//go:build tools

// Package controlplane records the commands build.sh compiles so that `go mod tidy` keeps their
// dependencies (and go.sum lines) in this module. The build tag keeps it out of every real build.
package controlplane

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
