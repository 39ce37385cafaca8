#!/bin/sh
# Installs this Python project into the environment whose `python` and `pip` come first on PATH,
# in two steps that the Dockerfile's build stages run as two layers, so that editing the source
# reinstalls only the project:
#
#   EXTRAS=operator install-python-project.sh dependencies   (needs ./pyproject.toml alone)
#   EXTRAS=operator install-python-project.sh project        (needs the source in .)
#
# `dependencies` pip-installs the requirements of the core package and of the extras named in
# EXTRAS (comma-separated), read from pyproject.toml; `project` pip-installs ".[EXTRAS]" from the
# source. `requirements` only prints those requirements, one a line. pip reads its settings from
# its own configuration (the Dockerfile mounts pip.conf there as a build secret).
set -eu

usage() {
	echo "usage: EXTRAS=extra[,extra...] $0 requirements|dependencies|project" >&2
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

[ "$#" -eq 1 ] || usage
[ -n "${EXTRAS:-}" ] || usage
case $1 in
requirements)
	requirements
	;;
dependencies)
	list=$(mktemp)
	trap 'rm -f "$list"' EXIT
	requirements >"$list"
	pip install --no-cache-dir -r "$list"
	;;
project)
	pip install --no-cache-dir ".[$EXTRAS]"
	;;
*)
	usage
	;;
esac
