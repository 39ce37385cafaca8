"""`hf://` backbones reach a job's processes through its store: downloaded once per job.

Real parts: the trainer under torchrun (2 processes, DeepSpeed on CPU), a real S3 server
(SeaweedFS, the tests' own on loopback) as the job's store, and the Hugging Face cache, offline
(`HF_HUB_OFFLINE=1`; a tiny model written in the hub cache's layout, since nothing may be
downloaded here)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from ulmfit_trainer.config import (
    ClassifierStageSpec,
    DataSpec,
    LMStageSpec,
    ModelFamily,
    ModelSpec,
    S3Settings,
    StageConfig,
)
from ulmfit_trainer.store import open_store

from tests.harness.parts import require_modules
from tests.harness.s3 import SeaweedS3
from tests.integration.test_trainer_pipeline import RUN, base_config, check, run_stage
from tests.unit.test_backbones import WORDS, _cache_repo

require_modules("torch", "deepspeed", "transformers", "huggingface_hub")

URI = "hf://org/tiny-bert"


@pytest.mark.timeout(600)
def test_an_hf_backbone_is_copied_into_the_job_store_once_and_read_from_there(
    tmp_path: Path, s3_server: SeaweedS3, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first stage's rank 0 copies the snapshot from the Hub cache into
    `<run>/backbones/org--tiny-bert/` (marker last) and both ranks train from it; a later stage
    finds it there and needs no Hub cache at all."""
    hub = tmp_path / "hf"
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HOME", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    snapshot = _cache_repo(hub / "hub", "org/tiny-bert", ModelFamily.MASKED, WORDS)

    s3 = S3Settings(endpoint=s3_server.url, bucket=s3_bucket)
    common = {
        **base_config(tmp_path / "unused"),
        "store_root": f"s3://{s3_bucket}/jobs",
        "s3": s3,
        "data": DataSpec(
            max_length=16, max_train_examples=32, max_unlabeled_examples=16, max_eval_examples=16
        ),
        "model": ModelSpec(family="masked", pretrained=URI),
    }
    classifier = ClassifierStageSpec(
        unfreeze_phases=1, epochs_per_phase=1, final_epochs=0, batch_size=8, head_hidden_size=8
    )
    first = run_stage(StageConfig(stage="classifier", classifier=classifier, **common), tmp_path)
    check(first)
    output = first.stdout + first.stderr
    assert output.count(f"{URI} copied to s3://{s3_bucket}/jobs/{RUN}/backbones/") == 1, output

    store = open_store(f"s3://{s3_bucket}/jobs", s3)
    prefix = f"{RUN}/backbones/org--tiny-bert"
    copied = {info.key.removeprefix(prefix + "/") for info in store.list(prefix + "/")}
    in_cache = {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()}
    assert copied == in_cache | {"backbone-source.json"}
    marker = json.loads(store.get_bytes(f"{prefix}/backbone-source.json"))
    assert (marker["uri"], marker["files"]) == (URI, len(in_cache))

    # No Hub cache any more (offline, it could not be filled again): the store's copy serves.
    shutil.rmtree(hub)
    lm = LMStageSpec(max_steps=2, batch_size=4, checkpoint_every=100)
    second = run_stage(StageConfig(stage="finetune", lm=lm, **common), tmp_path)
    check(second)
    assert "copied to" not in second.stdout + second.stderr
