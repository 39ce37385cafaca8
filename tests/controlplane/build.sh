#!/usr/bin/env bash
# Build the real Kubernetes the tests start, compiled from the Go modules pinned in go.mod next to
# this script: etcd, kube-apiserver, and for the one-node cluster kube-controller-manager,
# kube-scheduler, kube-proxy and kubelet.
#
#   bash tests/controlplane/build.sh        # prints the directory holding the binaries, last line
#
# Binaries are cached under ${XDG_CACHE_HOME:-$HOME/.cache}/ulmfit-operator/controlplane/
# <kubernetes-version>-<etcd-version>/; when both are there the script only prints that path.
# Needs Go >= 1.21 (any older `go`, or none, is handled: see go-toolchain.sh) and the Go module
# proxy.
# Set ULMFIT_CONTROLPLANE_DIR to the printed path to point the tests at another build.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

log() { printf 'controlplane: %s\n' "$*" >&2; }

module_version() {
	# The version go.mod requires for module $1 (a require line, never a replace line).
	awk -v mod="$1" '$1 == mod && $2 ~ /^v/ { print $2; exit }' "$here/go.mod"
}

k8s_version="$(module_version k8s.io/kubernetes)"
etcd_version="$(module_version go.etcd.io/etcd/server/v3)"
[[ -n $k8s_version && -n $etcd_version ]] || { log "cannot read versions from go.mod"; exit 1; }

cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/ulmfit-operator/controlplane"
out="$cache_root/$k8s_version-$etcd_version"
components=(kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubelet)
all_built() {
	local name
	for name in etcd "${components[@]}"; do
		[[ -x $1/$name ]] || return 1
	done
}
if all_built "$out"; then
	echo "$out"
	exit 0
fi

# shellcheck source=tests/controlplane/go-toolchain.sh
source "$here/go-toolchain.sh"

find_go
cd "$here"

start=$SECONDS
mkdir -p "$cache_root"
work="$(mktemp -d "$cache_root/.build.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# The published module carries no git metadata: stamp the release version and the release time
# (from the module proxy) so that `kubectl version` reports what was built.
release_time="$("$GO" list -m -f '{{if .Time}}{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}{{end}}' \
	k8s.io/kubernetes)"
IFS=. read -r major minor _ <<<"${k8s_version#v}"
pkg=k8s.io/component-base/version
k8s_ldflags="-s -w -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
k8s_ldflags+=" -X $pkg.gitCommit= -X $pkg.gitTreeState=clean -X $pkg.buildDate=$release_time"

export CGO_ENABLED=0
log "building ${components[*]} $k8s_version and etcd $etcd_version with $("$GO" env GOVERSION)"
# One `go build` for all of them: the packages they share compile once.
packages=()
for name in "${components[@]}"; do packages+=("k8s.io/kubernetes/cmd/$name"); done
"$GO" build -trimpath -ldflags "$k8s_ldflags" -o "$work/" "${packages[@]}"
"$GO" build -trimpath -ldflags "-s -w" -o "$work/etcd" ./etcd
"$work/etcd" --version >&2
for name in "${components[@]}"; do "$work/$name" --version >&2; done

# Publish atomically: a reader sees every binary or none.
rm -rf "$out"
mv "$work" "$out" 2>/dev/null || all_built "$out"
chmod 755 "$out"
trap - EXIT
log "built in $((SECONDS - start))s"
echo "$out"
