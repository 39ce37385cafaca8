#!/usr/bin/env bash
# Build the controllers the one-node test cluster runs as plain host processes, from published Go
# modules, each cached on its own by version:
#
#   training-operator  the Kubeflow Training Operator (PyTorchJob controller), with its
#                      PyTorchJob CRD: DIR/training-operator, DIR/crds/kubeflow.org_pytorchjobs.yaml
#   trainer            Kubeflow Trainer v2's controller manager (TrainJob and the training
#                      runtimes), with its three trainer.kubeflow.org CRDs:
#                      DIR/trainer-controller-manager, DIR/crds/trainer.kubeflow.org_*.yaml
#   jobset             the JobSet controller, which runs what a TrainJob becomes, with its CRD:
#                      DIR/jobset, DIR/crds/jobset.x-k8s.io_jobsets.yaml
#   kuberay            the KubeRay operator, with the ray.io CRDs it watches:
#                      DIR/ray-operator, DIR/crds/ray.io_{rayclusters,rayjobs,rayservices}.yaml
#   kueue              the Kueue controller-manager (job queueing and quota admission), with
#                      all its kueue.x-k8s.io CRDs: DIR/kueue, DIR/crds/kueue.x-k8s.io_*.yaml
#   coredns            CoreDNS with only the cluster-DNS plugins, no forwarding (wrapper module in
#                      ./coredns: the plugin list is in its main.go): DIR/coredns
#
#   bash tests/cluster/controllers/build.sh [COMPONENT...]    # default: all six
#
# Output: stdout carries exactly one line per requested component, in the order asked for,
#
#   NAME=DIR        e.g. kuberay=/home/me/.cache/ulmfit-operator/controllers/kuberay-v1.5.0
#
# and nothing else; progress and errors go to stderr. DIR is
# ${XDG_CACHE_HOME:-$HOME/.cache}/ulmfit-operator/controllers/<name>-<version>[-<hash>]/ and is
# published whole or not at all; when it is already there the component is not rebuilt (a run
# with everything cached starts no go command). The coredns directory name also carries a hash
# of the wrapper module's files, so editing its plugin list builds a new one.
#
# Versions: the three controllers below; CoreDNS in coredns/go.mod. Needs Go >= 1.21 (an older
# `go`, or none, is handled the same way as in tests/controlplane/build.sh) and the Go module
# proxy. Kueue's go.mod asks for Go 1.25; an older go >= 1.21 fetches that toolchain itself.
set -euo pipefail

training_operator_version="v1.9.4" # github.com/kubeflow/training-operator
trainer_version="v2.3.0"           # github.com/kubeflow/trainer/v2
jobset_version="v0.12.0"           # sigs.k8s.io/jobset (the release Trainer v2.3.0 pairs with)
kuberay_version="v1.5.0"           # github.com/ray-project/kuberay/ray-operator
kueue_version="v0.17.0"            # sigs.k8s.io/kueue

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
all_components=(training-operator trainer jobset kuberay kueue coredns)

log() { printf 'controllers: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/ulmfit-operator/controllers"

coredns_version="$(awk '$1 == "require" && $2 == "github.com/coredns/coredns" { print $3; exit }
	$1 == "github.com/coredns/coredns" && $2 ~ /^v/ { print $2; exit }' "$here/coredns/go.mod")"
[[ -n $coredns_version ]] || die "cannot read the CoreDNS version from coredns/go.mod"

# output_dir NAME: where NAME's build lives. binary NAME: the executable in it.
output_dir() {
	case $1 in
	training-operator) echo "$cache_root/training-operator-$training_operator_version" ;;
	trainer) echo "$cache_root/trainer-$trainer_version" ;;
	jobset) echo "$cache_root/jobset-$jobset_version" ;;
	kuberay) echo "$cache_root/kuberay-$kuberay_version" ;;
	kueue) echo "$cache_root/kueue-$kueue_version" ;;
	coredns)
		local sum
		sum="$(cd "$here/coredns" && cat go.mod go.sum main.go | sha256sum)"
		echo "$cache_root/coredns-$coredns_version-${sum:0:12}"
		;;
	esac
}
binary() {
	case $1 in
	training-operator) echo training-operator ;;
	trainer) echo trainer-controller-manager ;;
	jobset) echo jobset ;;
	kuberay) echo ray-operator ;;
	kueue) echo kueue ;;
	coredns) echo coredns ;;
	esac
}

requested=("$@")
[[ ${#requested[@]} -gt 0 ]] || requested=("${all_components[@]}")
for name in "${requested[@]}"; do
	case $name in
	training-operator | trainer | jobset | kuberay | kueue | coredns) ;;
	*) die "unknown component '$name' (known: ${all_components[*]})" ;;
	esac
done

# shellcheck source=tests/controlplane/go-toolchain.sh
source "$here/../../controlplane/go-toolchain.sh"

# copy_crds FROM_DIR TO_DIR FILE...: copy CRD manifests out of a (read-only) module tree.
copy_crds() {
	local from="$1" to="$2" file
	shift 2
	mkdir -p "$to"
	for file in "$@"; do
		[[ -f $from/$file ]] || die "missing $file in $from"
		install -m 644 "$from/$file" "$to/"
	done
}

export CGO_ENABLED=0
go_flags=(-trimpath -ldflags "-s -w")

# go_install PACKAGE@VERSION DEST: build one main package of a published module into the file
# DEST. `go install pkg@version` builds it with the module's own go.mod (no replace directives
# in the three used here) and ignores any module in the current directory.
go_install() {
	local bin_dir="$work/.bin"
	GOBIN="$bin_dir" "$GO" install "${go_flags[@]}" "$1"
	local built=("$bin_dir"/*)
	[[ ${#built[@]} -eq 1 && -x ${built[0]} ]] || die "go install $1 left no single binary"
	mv "${built[0]}" "$2"
	rmdir "$bin_dir"
}

# check_help BINARY FLAG: the binary runs and its --help lists FLAG.
check_help() {
	local help
	help="$("$1" --help 2>&1)" || true # Go's flag package may exit 0 or 2 after --help
	grep -qE -- "^[[:space:]]+$2([[:space:]]|\$)" <<<"$help" ||
		die "$(basename "$1") --help does not list $2"
}

build_training_operator() {
	local module=github.com/kubeflow/training-operator
	local dir
	go_install "$module/cmd/training-operator.v1@$training_operator_version" "$work/training-operator"
	dir="$(module_dir "$GO" "$module@$training_operator_version")"
	copy_crds "$dir/manifests/base/crds" "$work/crds" kubeflow.org_pytorchjobs.yaml
	# It has no version flag; its flag list shows that it runs.
	check_help "$work/training-operator" -enable-scheme
}

build_trainer() {
	local module=github.com/kubeflow/trainer/v2 dir
	go_install "$module/cmd/trainer-controller-manager@$trainer_version" \
		"$work/trainer-controller-manager"
	# The runtimes' CRDs too: a TrainJob names its runtime, and the manager watches all three.
	dir="$(module_dir "$GO" "$module@$trainer_version")"
	copy_crds "$dir/manifests/base/crds" "$work/crds" \
		trainer.kubeflow.org_trainjobs.yaml trainer.kubeflow.org_trainingruntimes.yaml \
		trainer.kubeflow.org_clustertrainingruntimes.yaml
	check_help "$work/trainer-controller-manager" -config
}

build_jobset() {
	local module=sigs.k8s.io/jobset dir
	# Built inside its module, not with `go install MODULE@VERSION`: for a main package at a
	# module's root that asks the proxy for the module's version list (to look for a deprecation
	# notice), which the proxy here refuses.
	dir="$(module_dir "$GO" "$module@$jobset_version")"
	(cd "$dir" && GOWORK=off "$GO" build -mod=readonly "${go_flags[@]}" -o "$work/jobset" .)
	copy_crds "$dir/config/components/crd/bases" "$work/crds" jobset.x-k8s.io_jobsets.yaml
	check_help "$work/jobset" -config
}

build_kuberay() {
	local module=github.com/ray-project/kuberay/ray-operator dir
	go_install "$module@$kuberay_version" "$work/ray-operator"
	# The operator always starts its RayCluster, RayJob and RayService controllers, so all three
	# CRDs must be installed before it starts; it needs no other CRD unless a batch scheduler or
	# an alpha feature gate is switched on.
	dir="$(module_dir "$GO" "$module@$kuberay_version")"
	copy_crds "$dir/config/crd/bases" "$work/crds" \
		ray.io_rayclusters.yaml ray.io_rayjobs.yaml ray.io_rayservices.yaml
	check_help "$work/ray-operator" -use-kubernetes-proxy
}

build_kueue() {
	local module=sigs.k8s.io/kueue dir crd
	go_install "$module/cmd/kueue@$kueue_version" "$work/kueue"
	# All of them, not just the queue kinds the tests create: with its default feature gates the
	# manager also watches cohorts, admission checks, topologies and the MultiKueue kinds, and a
	# watch on a kind the API server does not serve keeps it from starting.
	dir="$(module_dir "$GO" "$module@$kueue_version")"
	local crds=()
	for crd in "$dir"/config/components/crd/bases/kueue.x-k8s.io_*.yaml; do
		crds+=("$(basename "$crd")")
	done
	[[ ${#crds[@]} -gt 0 ]] || die "no kueue.x-k8s.io CRDs in $dir"
	copy_crds "$dir/config/components/crd/bases" "$work/crds" "${crds[@]}"
	check_help "$work/kueue" -config
}

build_coredns() {
	# A local wrapper module: built with its own go.mod/go.sum, which must be tidy (-mod=readonly).
	(cd "$here/coredns" && GOWORK=off "$GO" build -mod=readonly "${go_flags[@]}" -o "$work/coredns" .)
	"$work/coredns" -version >&2
}

# is_built DIR NAME: DIR holds NAME's binary and, for the operators, their CRDs.
is_built() {
	[[ -x $1/$(binary "$2") ]] || return 1
	[[ $2 == coredns ]] || compgen -G "$1/crds/*.yaml" >/dev/null
}

for name in "${requested[@]}"; do
	out="$(output_dir "$name")"
	if is_built "$out" "$name"; then
		echo "$name=$out"
		continue
	fi
	find_go
	start=$SECONDS
	mkdir -p "$cache_root"
	work="$(mktemp -d "$cache_root/.build-$name.XXXXXX")"
	trap 'rm -rf "$work"' EXIT
	log "building $name ($(basename "$out")) with $("$GO" env GOVERSION)"
	"build_${name//-/_}"
	# Publish atomically: a reader sees the whole directory or none of it. A concurrent run that
	# got there first wins; ours is then dropped.
	chmod 755 "$work"
	[[ ! -e $out ]] || is_built "$out" "$name" || rm -rf "$out" # a leftover, not a build
	if ! mv -T "$work" "$out" 2>/dev/null; then
		is_built "$out" "$name" || die "could not publish $out"
		rm -rf "$work"
	fi
	trap - EXIT
	log "$name built in $((SECONDS - start))s: $(du -h "$out/$(binary "$name")" | cut -f1)"
	echo "$name=$out"
done
