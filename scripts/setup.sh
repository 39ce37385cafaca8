#!/usr/bin/env bash
# Everything `make test` needs before its first test, with the independent steps overlapped, and
# the wall time of each step printed as it ends and again as a table at the end.
#
#   bash scripts/setup.sh          (`make cluster-build`)
#   bash scripts/setup.sh --lint   (the set-up half of `make test`: the linters too, `make lint`)
#
# The steps and what each waits for:
#
#   node-packages   Debian's containerd, runc, CNI plugins, debootstrap, buildah   network, disk
#   python-env      .venv from requirements.lock, DeepSpeed's CPU op compiled        network, CPU
#   kubernetes      etcd and the Kubernetes binaries (tests/controlplane/build.sh)   CPU
#   controllers     each controller in tests/cluster/controllers/build.sh            CPU
#   base-image      the Debian base image (debootstrap)               node-packages; network
#   images          pause, init, trainer, operator          base-image, python-env; disk
#   lint            ruff, import-linter, mypy (with --lint)                python-env; CPU
#
# The Go builds take most of the CPU; the package downloads, debootstrap and the image layers
# mostly wait on the network and the disk, so they run beside them. Each step is cached by its own
# script, keyed by its inputs: a rerun with nothing changed takes seconds.
# A step's output goes to its log under $ULMFIT_SETUP_LOGS (default: a temporary directory); a
# failed step prints the end of its log, and the script exits non-zero once every started step
# has ended.
set -euo pipefail
cd "$(dirname "$0")/.."

lint=false
case ${1:-} in
--lint) lint=true ;;
"") ;;
*) echo "usage: bash scripts/setup.sh [--lint]" >&2; exit 2 ;;
esac
logs=${ULMFIT_SETUP_LOGS:-$(mktemp -d -t ulmfit-setup.XXXXXX)}
mkdir -p "$logs"
start_all=$SECONDS
declare -A pids=() started=() took=() failed=()

# start NAME COMMAND...: run COMMAND in the background, its output in $logs/NAME.log.
start() {
	local name=$1
	shift
	started[$name]=$SECONDS
	echo "setup: $name started" >&2
	# The step records its own end: it may end long before the script waits for it.
	(
		if "$@"; then status=0; else status=$?; fi
		echo $((SECONDS - started[$name])) >"$logs/$name.seconds"
		exit "$status"
	) >"$logs/$name.log" 2>&1 &
	pids[$name]=$!
}

# finish NAME...: wait for each step; record its time, or its failure.
finish() {
	local name status
	for name in "$@"; do
		status=0
		wait "${pids[$name]}" || status=$?
		took[$name]=$(cat "$logs/$name.seconds" 2>/dev/null || echo $((SECONDS - started[$name])))
		if ((status == 0)); then
			echo "setup: $name done in ${took[$name]}s" >&2
		else
			failed[$name]=$status
			echo "setup: $name FAILED (exit $status) after ${took[$name]}s; the end of its log:" >&2
			tail -n 40 "$logs/$name.log" | sed "s/^/  $name| /" >&2
		fi
	done
}

summary() {
	local name
	echo "setup: wall time per step (logs in $logs)" >&2
	for name in node-packages python-env kubernetes controllers base-image images lint; do
		[[ -n ${took[$name]:-} ]] || continue
		printf 'setup: | %-14s | %5ss |%s\n' "$name" "${took[$name]}" \
			"${failed[$name]:+ failed}" >&2
	done
	printf 'setup: | %-14s | %5ss |\n' "all (overlapped)" "$((SECONDS - start_all))" >&2
	# Within the steps: each Go build, DeepSpeed's op, each image layer built (none when cached).
	grep -hE 'built in [0-9]+s|MB in [0-9]+s|--target [a-z]+: [0-9]+s' "$logs"/*.log |
		sed 's/^/setup:   /' >&2 || true
}

start node-packages bash scripts/install-node-packages.sh
start python-env bash scripts/bootstrap.sh
start kubernetes bash tests/controlplane/build.sh
# The controllers one after another: the Kubernetes build beside them already fills both cores.
start controllers bash tests/cluster/controllers/build.sh

finish node-packages
if [[ -z ${failed[node-packages]:-} ]]; then
	# Only the standard library: it runs before .venv exists, with bootstrap.sh's interpreter.
	start base-image "${PYTHON:-python3}" -m tests.cluster.images build base
fi
finish python-env
if $lint && [[ -z ${failed[python-env]:-} ]]; then
	start lint make --no-print-directory lint-checks
fi
if [[ -n ${pids[base-image]:-} ]]; then
	finish base-image
fi
if [[ -z ${failed[python-env]:-} && -z ${failed[node-packages]:-} && -z ${failed[base-image]:-} ]]; then
	# `prune` builds every image (the base from the cache) and drops layers none of them uses.
	start images .venv/bin/python -m tests.cluster.images prune
	finish images
fi
finish kubernetes controllers
if [[ -n ${pids[lint]:-} ]]; then
	finish lint
fi
summary
((${#failed[@]} == 0))
