#!/usr/bin/env bash
# Creates .venv with everything the project needs: the package (editable) with its operator,
# trainer and test extras, each distribution at the version requirements.lock pins, and DeepSpeed
# with its CPU shared-memory op compiled (so no training step compiles it). Safe to rerun: it
# only installs what is missing or changed, in a few seconds.
#
#   bash scripts/bootstrap.sh              set up .venv (`make env`)
#   bash scripts/bootstrap.sh lock [ARG]   re-resolve requirements.lock from pyproject.toml
#                                          (`make lock`); ARGs go to `uv pip compile`, e.g.
#                                          --upgrade (pins that still fit are kept otherwise)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
LOCK=requirements.lock
EXTRAS=(operator trainer test optuna) # what the lock covers; .venv gets all but optuna (in test)

# The version the lock pins for a distribution (empty when it pins none).
pinned() {
  [[ -f $LOCK ]] || return 0
  sed -n "s/^$1==\([^ ;]*\).*/\1/p" "$LOCK" | head -n 1
}

if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
uv_version=$(pinned uv) # uv itself is pinned by the lock too
installed_uv=$( (.venv/bin/uv --version 2>/dev/null || true) | cut -d' ' -f2)
if [[ -z $installed_uv || -n $uv_version && $installed_uv != "$uv_version" ]]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "uv${uv_version:+==$uv_version}"
fi

if [[ ${1:-} == lock ]]; then
  shift
  # The project's requirements with every extra, its build requirements (source builds are
  # constrained by the lock too) and uv itself, resolved for every platform and Python >= 3.11:
  # the dev venv is 3.11, the trainer image 3.12. No index URL is written into the file.
  .venv/bin/python -c '
import tomllib
with open("pyproject.toml", "rb") as file:
    print("\n".join([*tomllib.load(file)["build-system"]["requires"], "uv"]))' |
    .venv/bin/uv pip compile --quiet pyproject.toml - "${EXTRAS[@]/#/--extra=}" \
      --universal --python-version 3.11 --custom-compile-command "make lock" -o "$LOCK" "$@"
  echo "resolved $LOCK ($(grep -c '^[a-z0-9]' "$LOCK") pins)"
  exit 0
fi
[[ -f $LOCK ]] || { echo "$LOCK is missing: run \`make lock\`" >&2; exit 1; }

uv_install() {
  .venv/bin/uv pip install --quiet --python .venv/bin/python \
    --constraints "$LOCK" --build-constraints "$LOCK" "$@"
}

# Whether the installed DeepSpeed is the lock's, with the shared-memory op prebuilt for the CPU
# accelerator against the installed torch (read from its build record, without importing it).
deepspeed_ready() {
  .venv/bin/python - "$(pinned deepspeed)" <<'PYTHON'
import ast
import sys
from importlib import metadata

try:
    deepspeed = metadata.distribution("deepspeed")
    torch = metadata.version("torch")
    built = deepspeed.locate_file("deepspeed/git_version_info_installed.py").read_text()
except (metadata.PackageNotFoundError, OSError):
    sys.exit(1)
info = {
    target.id: ast.literal_eval(node.value)
    for node in ast.parse(built).body
    if isinstance(node, ast.Assign)
    for target in node.targets
    if isinstance(target, ast.Name)
}
sys.exit(
    0
    if deepspeed.version == sys.argv[1]
    and info.get("installed_ops", {}).get("deepspeed_shm_comm")
    and info.get("accelerator_name") == "cpu"
    and info.get("torch_info", {}).get("version") == ".".join(torch.split(".")[:2])
    else 1
)
PYTHON
}

# DeepSpeed builds from source against the installed torch (no build isolation); its CPU
# shared-memory op is compiled into it here (a minute or two) instead of at a CPU stage's first
# step. The build is not byte-for-byte repeatable, and the test cluster's trainer image keys its
# venv layer (gigabytes) by the installed files' hashes, so the wheel is built once per DeepSpeed,
# torch and Python, kept in the cache, and every venv (a fresh clone's too) installs that same
# wheel. --reinstall-package keeps uv from reusing a DeepSpeed it installed without the op.
# The op's build needs a C++ compiler and the interpreter's headers: installed when missing
# (Debian/Ubuntu, as root), else a clear stop.
build_tools() {
  local include
  include=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  command -v c++ >/dev/null && [[ -f $include/Python.h ]] && return 0
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq g++ python3-dev >/dev/null
  fi
  command -v c++ >/dev/null && [[ -f $include/Python.h ]] && return 0
  echo "DeepSpeed's build needs a C++ compiler and $include/Python.h (e.g. g++ python3-dev)" >&2
  exit 1
}

# Where the wheel for the installed torch and Python lives (keyed by every input of the build).
deepspeed_wheels() {
  local key
  # (No f-string here: Python 3.11 refuses the escaped quotes one would need inside it.)
  key=$(.venv/bin/python -c 'import sys; from importlib.metadata import version
print("torch" + version("torch") + "-cp%d%d" % sys.version_info[:2])')
  [[ -n $key ]] || { echo "cannot read the torch and Python versions from .venv" >&2; exit 1; }
  echo "${XDG_CACHE_HOME:-$HOME/.cache}/ulmfit-operator/wheels/deepspeed-$(pinned deepspeed)-$key-cpu-shm"
}

uv_install torch setuptools wheel
if ! deepspeed_ready; then
  wheels=$(deepspeed_wheels)
  if ! compgen -G "$wheels/deepspeed-*.whl" >/dev/null; then
    build_tools
    echo "building DeepSpeed $(pinned deepspeed) with its CPU shared-memory op (1-2 minutes, once)"
    deepspeed_start=$SECONDS
    mkdir -p "$(dirname "$wheels")"
    building=$(mktemp -d "$wheels.XXXXXX")
    DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 DS_ACCELERATOR=cpu \
      .venv/bin/python -m pip wheel --quiet --disable-pip-version-check --no-deps \
      --no-build-isolation "deepspeed==$(pinned deepspeed)" --wheel-dir "$building"
    # Published whole or not at all; a concurrent build that got there first wins.
    mv -T "$building" "$wheels" 2>/dev/null || rm -rf "$building"
    echo "DeepSpeed and its op built in $((SECONDS - deepspeed_start))s"
  fi
  uv_install --reinstall-package deepspeed "$wheels"/deepspeed-*.whl
  deepspeed_ready || { echo "DeepSpeed was installed without its shared-memory op" >&2; exit 1; }
fi
uv_install -e ".[operator,trainer,test]"
echo "environment ready: .venv ($(.venv/bin/python --version)), pinned by $LOCK"
