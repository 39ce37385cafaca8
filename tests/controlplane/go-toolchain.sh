# shellcheck shell=bash
# Sourced by the build scripts of the test cluster (tests/controlplane/build.sh and
# tests/cluster/controllers/build.sh): finds a go command able to build the pinned modules.
# The sourcing script defines log(); after find_go, $GO is the go command to run.

# Used only when the go on this machine predates toolchain switching (Go 1.21).
fallback_toolchain="go1.25.14"
GO=""

version_at_least() { # $1 >= $2, both like 1.21.3
	[[ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" == "$2" ]]
}

# module_dir GO MODULE@VERSION: download the module and print its directory in the module cache.
module_dir() {
	(cd / && GO111MODULE=on GOFLAGS='' "$1" mod download -json "$2") |
		sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p'
}

find_go() {
	[[ -z $GO ]] || return 0
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
		# Newer go commands fetch the toolchain a go.mod asks for through the module proxy.
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
	dir="$(module_dir "$go_bin" "$module")"
	[[ -n $dir && -f $dir/bin/go ]] || { log "could not download $module"; exit 1; }
	# Module cache files are read-only and carry no exec bit.
	chmod u+x "$dir"/bin/* "$dir"/pkg/tool/*/*
	export GOROOT="$dir" GOTOOLCHAIN=local
	GO="$dir/bin/go"
}
