# The two commands of the README: `make example` and `make test`. Both set up what they need.
.PHONY: env example controlplane cluster-build cluster cluster-smoke lint lint-checks test test-fast generate

VENV := .venv/bin

env:
	bash scripts/bootstrap.sh

# Re-resolve requirements.lock after editing pyproject.toml's requirements; pins that still fit
# are kept (`bash scripts/bootstrap.sh lock --upgrade` moves every pin to the newest release).
.PHONY: lock
lock:
	bash scripts/bootstrap.sh lock

example: env
	$(VENV)/ulmfit run examples/ulmfitjob.yaml

controlplane:
	bash tests/controlplane/build.sh

# Everything the tests need (the one-node cluster needs root): .venv, Debian's containerd/runc/CNI
# plugins, Kubernetes and the controllers from Go modules, and the images, all cached; independent
# steps overlap, and each step's wall time is printed (scripts/setup.sh).
cluster-build:
	bash scripts/setup.sh

cluster: cluster-build
	$(VENV)/python -m tests.cluster up

cluster-smoke: cluster-build
	$(VENV)/python -m tests.cluster smoke

lint: env lint-checks

# The checks alone, on an existing .venv (scripts/setup.sh --lint runs them beside the builds).
lint-checks:
	$(VENV)/ruff check operator trainer tests benchmarks scripts
	$(VENV)/lint-imports
	$(VENV)/mypy

# Two pytest-xdist workers: the tests on the one-node cluster mostly wait on pods, so they run in
# one worker (their group, in file order) while the other takes the rest, most of it CPU-bound
# (tests/harness/cluster.py). --durations: the 30 slowest tests, to see where the time goes.
PYTEST := $(VENV)/python -m pytest -n 2 --dist loadgroup --durations=30

test:
	bash scripts/setup.sh --lint
	$(PYTEST)

test-fast: cluster-build
	$(PYTEST) -m "not slow"

# Regenerate everything derived from api.py: the CRD (also copied into the chart), the TrainJobs'
# ClusterTrainingRuntime (likewise) and the README reference. Tests fail when these drift.
generate: env
	$(VENV)/ulmfit crd > manifests/crd/ulmfit.io_ulmfitjobs.yaml
	$(VENV)/ulmfit training-runtime > manifests/trainer/cluster-training-runtime.yaml
	$(VENV)/python scripts/sync_chart.py
	$(VENV)/python scripts/sync_readme.py
