# The two commands of the README: `make example` and `make test`. Both set up what they need.
.PHONY: env example controlplane lint test test-fast crd

VENV := .venv/bin

env:
	bash scripts/bootstrap.sh

example: env
	$(VENV)/ulmfit run examples/ulmfitjob.yaml

controlplane:
	bash tests/controlplane/build.sh

lint: env
	$(VENV)/ruff check operator trainer tests benchmarks scripts
	$(VENV)/lint-imports
	$(VENV)/mypy

test: env controlplane lint
	$(VENV)/python -m pytest

test-fast: env controlplane
	$(VENV)/python -m pytest -m "not slow"

crd: env
	$(VENV)/ulmfit crd > manifests/crd/ulmfit.io_ulmfitjobs.yaml
