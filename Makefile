# The two commands of the README: `make example` and `make test`. Both set up what they need.
.PHONY: env example controlplane lint test test-fast generate

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

# Regenerate everything derived from api.py: the CRD (also copied into the chart) and the README
# reference. Tests fail when these drift.
generate: env
	$(VENV)/ulmfit crd > manifests/crd/ulmfit.io_ulmfitjobs.yaml
	$(VENV)/python scripts/sync_chart.py
	$(VENV)/python scripts/sync_readme.py
