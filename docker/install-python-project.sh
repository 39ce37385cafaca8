#!/bin/sh
# Installs this Python project into the environment whose `python` and `pip` come first on PATH,
# in two steps that the Dockerfile's build stages run as two layers, so that editing the source
# reinstalls only the project:
#
#   EXTRAS=operator install-python-project.sh dependencies   (needs ./pyproject.toml and
#                                                             ./requirements.lock alone)
#   EXTRAS=operator install-python-project.sh project        (needs the source in .)
#
# `dependencies` pip-installs the requirements of the core package and of the extras named in
# EXTRAS (comma-separated), read from pyproject.toml; `project` pip-installs ".[EXTRAS]" from the
# source. Both install with requirements.lock as constraints, so every distribution is at the
# version the lock pins (the one `make env` installs). `requirements` only prints those
# requirements, one a line; `constraints` prints the constraints pip gets: the lock's pins, less
# those of distributions that an installed one pins exactly to another version (the trainer
# image's torch, from a CUDA index, brings its own nvidia-* builds).
#
# NO_BUILD_ISOLATION (names, space-separated) are built, with the lock's setuptools and wheel,
# against the environment instead of in an isolated one, before the rest: DeepSpeed compiles the
# ops its DS_BUILD_* variables ask for against the installed torch. pip reads its settings from
# its own configuration (the Dockerfile mounts pip.conf there as a build secret).
set -eu

usage() {
	echo "usage: EXTRAS=extra[,extra...] $0 requirements|constraints|dependencies|project" >&2
	exit 2
}

requirements() {
	python - "$EXTRAS" <<'PYTHON'
import sys
import tomllib

with open("pyproject.toml", "rb") as file:
    project = tomllib.load(file)["project"]
requirements = list(project.get("dependencies", []))
for extra in sys.argv[1].split(","):
    if extra not in project.get("optional-dependencies", {}):
        sys.exit(f"pyproject.toml has no extra {extra!r}")
    requirements += project["optional-dependencies"][extra]
for requirement in requirements:
    print(requirement)
PYTHON
}

constraints() {
	python - <<'PYTHON'
import re
import sys
from importlib import metadata


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


try:
    with open("requirements.lock") as file:
        lock = file.read().splitlines()
except FileNotFoundError:
    sys.exit("requirements.lock is missing (make lock)")
# What installed distributions require with a single `==`, but for their extras (markers are
# not evaluated otherwise: a pin that may apply is enough to leave the lock's other version out).
exact = {}
for dist in metadata.distributions():
    for requirement in dist.requires or []:
        if re.search(r";.*\bextra\b", requirement):
            continue
        name, extras, version = r"([A-Za-z0-9][A-Za-z0-9._-]*)", r"(?:\[[^]]*\])?", r"([^\s,;)]+)"
        match = re.match(rf"{name}\s*{extras}\s*\(?==\s*{version}\)?\s*(;|$)", requirement)
        if match:
            exact.setdefault(canonical(match[1]), set()).add(match[2])
for line in lock:
    match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
    if not match:
        continue
    pins = exact.get(canonical(match[1]), set())
    if pins and match[2] not in pins:
        print(f"requirements.lock: {line.strip()} left to what is installed", file=sys.stderr)
        continue
    print(line.strip())
PYTHON
}

[ "$#" -eq 1 ] || usage
[ -n "${EXTRAS:-}" ] || usage
case $1 in
requirements | constraints)
	"$1"
	;;
dependencies | project)
	pins=$(mktemp)
	list=$(mktemp)
	trap 'rm -f "$pins" "$list"' EXIT
	constraints >"$pins"
	if [ "$1" = project ]; then
		pip install --no-cache-dir -c "$pins" ".[$EXTRAS]"
		exit 0
	fi
	requirements >"$list"
	if [ -n "${NO_BUILD_ISOLATION:-}" ]; then
		pip install --no-cache-dir -c "$pins" setuptools wheel
		# shellcheck disable=SC2086 # a list of names
		pip install --no-cache-dir -c "$pins" --no-build-isolation $NO_BUILD_ISOLATION
	fi
	pip install --no-cache-dir -c "$pins" -r "$list"
	;;
*)
	usage
	;;
esac
