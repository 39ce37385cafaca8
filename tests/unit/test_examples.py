"""Every ULMFiTJob in examples/ passes `ulmfit validate`, and each example is what it says it is.

The API server's view of the same files is in tests/integration/test_deploy_manifests.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner
from ulmfit_operator.api import KIND, load_job_file
from ulmfit_operator.cli import app

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
JOB_EXAMPLES = [
    path
    for path in EXAMPLES
    if any(doc and doc.get("kind") == KIND for doc in yaml.safe_load_all(path.read_text()))
]
runner = CliRunner()


def test_every_example_is_a_job_or_a_secret_the_jobs_name() -> None:
    secrets = {
        doc["metadata"]["name"]
        for path in EXAMPLES
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc["kind"] == "Secret"
    }
    for path in EXAMPLES:
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc is None or doc["kind"] in {KIND, "Secret"}, f"{path.name}: {doc['kind']}"
    for path in JOB_EXAMPLES:
        ref = load_job_file(path.read_text()).spec.storage.credentials_secret_ref
        assert ref is None or ref in secrets, f"{path.name} names Secret {ref}, no example has it"


@pytest.mark.parametrize("path", JOB_EXAMPLES, ids=lambda p: p.name)
def test_ulmfit_validate_accepts_the_example(path: Path) -> None:
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    wire = json.loads(result.stdout)
    assert wire["kind"] == KIND and wire["metadata"]["name"]


def test_gpu_example_is_a_multi_node_bf16_job_on_a_pretrained_backbone() -> None:
    job = load_job_file((ROOT / "examples" / "ulmfitjob-gpu.yaml").read_text())
    resources = job.spec.resources
    assert resources.workers >= 2 and resources.gpus_per_worker >= 2
    assert resources.processes_per_worker == resources.gpus_per_worker
    assert job.spec.deepspeed.precision == "bf16"
    assert (job.spec.model.pretrained or "").startswith("s3://")
    assert job.spec.storage.s3 is not None and job.spec.storage.credentials_secret_ref


def test_s3_example_runs_the_embedded_data_on_cluster_storage() -> None:
    job = load_job_file((ROOT / "examples" / "ulmfitjob-s3.yaml").read_text())
    assert job.spec.data.dataset.startswith("builtin://")
    assert job.spec.storage.s3 is not None and job.spec.storage.credentials_secret_ref
    assert job.spec.resources.gpus_per_worker == 0
