#!/usr/bin/env bash
# Build the real Kubernetes the tests start, compiled from the Go modules pinned in go.mod next to
# this script: etcd, kube-apiserver, and for the one-node cluster kube-controller-manager,
# kube-scheduler, kube-proxy and kubelet.
#
#   bash tests/controlplane/build.sh        # prints the directory holding the binaries, last line
#
# Binaries are cached under ${XDG_CACHE_HOME:-$HOME/.cache}/ulmfit-operator/controlplane/
# <kubernetes-version>-<etcd-version>/; when both are there the script only prints that path.
# Needs Go >= 1.21 (any older `go`, or none, is handled: see find_go) and the Go module proxy.
# Set ULMFIT_CONTROLPLANE_DIR to the printed path to point the tests at another build.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# Used only when the go on this machine predates toolchain switching (Go 1.21).
fallback_toolchain="go1.25.14"

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

version_at_least() { # $1 >= $2, both like 1.21.3
	[[ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" == "$2" ]]
}

find_go() {
	local go_bin
	go_bin="$(command -v go || true)"
	if [[ -z $go_bin && -x /usr/local/go/bin/go ]]; then
		go_bin=/usr/local/go/bin/go
	fi
	if [[ -z $go_bin ]]; then
		log "no go found: installing Debian's golang-go"
		local sudo=""
		[[ $(id -u) -eq 0 ]] || sudo="sudo"
		$sudo apt-get update -qq >&2
		DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq golang-go >&2
		go_bin="$(command -v go)"
	fi
	local have
	have="$("$go_bin" env GOVERSION)"
	have="${have#go}"
	if version_at_least "$have" 1.21; then
		# Newer go commands fetch the toolchain go.mod asks for through the module proxy.
		# Debian's go.env says GOTOOLCHAIN=local; the environment wins over it.
		export GOTOOLCHAIN="${GOTOOLCHAIN:-auto}"
		GO="$go_bin"
		return
	fi
	# Go before 1.21 cannot switch toolchains itself, but it can download the toolchain module
	# that newer go commands use for that, from the same proxy.
	log "go $have is too old; fetching $fallback_toolchain through the module proxy"
	local arch module dir
	arch="$("$go_bin" env GOOS)-$("$go_bin" env GOARCH)"
	module="golang.org/toolchain@v0.0.1-$fallback_toolchain.$arch"
	dir="$(cd / && GO111MODULE=on "$go_bin" mod download -json "$module" |
		sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')"
	[[ -n $dir && -f $dir/bin/go ]] || { log "could not download $module"; exit 1; }
	# Module cache files are read-only and carry no exec bit.
	chmod u+x "$dir"/bin/* "$dir"/pkg/tool/*/*
	export GOROOT="$dir" GOTOOLCHAIN=local
	GO="$dir/bin/go"
}

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
