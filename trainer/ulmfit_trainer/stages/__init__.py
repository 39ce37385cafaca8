"""The pipeline's stages, and ``Context``: what every stage starts with.

Each stage module (``lm``, ``cotrain``, ``classifier``, ``tune``, ``evaluate``) has
``run(config: StageConfig) -> dict[str, float]``; every rank calls it and rank 0's metrics are
the stage's result. ``fitting`` (gradual unfreezing, shared by the classifier, co-training and
each sweep trial) and ``sweep`` (a sweep's bookkeeping, without Ray) are not stages. Imports run
one way: ``classifier`` uses ``cotrain``, ``sweep`` and ``fitting``; ``cotrain`` uses
``fitting``; ``tune`` uses ``sweep`` (and the classifier stage in each trial).

The data is checked against the stage's config (`ulmfit_trainer.preflight`) on the rows the
stage reads: `stage_runner` checks a local or built-in dataset before torch is even imported, so
a label the data lacks fails a stage in seconds; an S3 dataset is checked once `Context.dataset`
has downloaded it (still before any training), so it is not downloaded twice.

``Context`` holds the process group, the run's checkpoint store, a scratch directory, the dataset
and the job's tokenizer.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ulmfit_trainer.config import StageConfig, StageName
from ulmfit_trainer.errors import InvalidSpec, PermanentError
from ulmfit_trainer.preflight import check_stages, stage_problems
from ulmfit_trainer.store import CheckpointStore, NoCheckpoint, open_checkpoints

log = logging.getLogger(__name__)

MODULES = {
    StageName.PRETRAIN: "ulmfit_trainer.stages.lm",
    StageName.FINETUNE: "ulmfit_trainer.stages.lm",
    StageName.COTRAIN: "ulmfit_trainer.stages.cotrain",
    StageName.TUNE: "ulmfit_trainer.stages.tune",
    StageName.CLASSIFIER: "ulmfit_trainer.stages.classifier",
    StageName.EVALUATE: "ulmfit_trainer.stages.evaluate",
}


def stage_runner(stage: StageName) -> Callable[[StageConfig], dict[str, float]]:
    """``stage``'s ``run``, behind the preflight: the data is checked against the config
    (`ulmfit_trainer.preflight`, raising `InvalidSpec`) before the stage's module, and torch
    with it, is even imported."""

    def run(config: StageConfig) -> dict[str, float]:
        if not config.data.dataset.startswith("s3://"):
            check_stages([config])
        return importlib.import_module(MODULES[stage]).run(config)

    return run


@dataclass
class Context:
    config: StageConfig
    dist: Any  # engine.Dist
    checkpoints: CheckpointStore
    work: Path
    _dataset: Any = field(default=None, repr=False)
    _hub: Any = field(default=None, repr=False)

    @property
    def stage(self) -> str:
        """The stage's key in the store (`cotrain-<model>` for a co-trained model)."""
        return self.config.key

    @classmethod
    def start(cls, config: StageConfig, use_deepspeed: bool = True) -> Context:
        from ulmfit_trainer import engine

        dist = engine.init_distributed(use_deepspeed)
        engine.log_to_stderr(dist.rank)
        _quiet_transformers()
        # The same seed on every rank: models are built identically before DeepSpeed syncs them,
        # and the data order is dealt from one shared permutation.
        engine.seed_everything(config.seed)
        return cls(config, dist, open_checkpoints(config), engine.workdir())

    def dataset(self):
        from ulmfit_trainer.data import load_dataset

        if self._dataset is None:
            c = self.config
            dataset = load_dataset(c.data, c.s3, c.seed, self.work)
            problems = stage_problems(c, dataset.splits, dataset.labels)
            if problems:
                raise InvalidSpec(problems)
            self._dataset = dataset
        return self._dataset

    def tokenizer(self):
        """(tokenizer, local directory) of the job; trained here by rank 0 when missing."""
        from ulmfit_trainer.tokenize import job_tokenizer

        dataset = self.dataset()
        return job_tokenizer(
            self.config,
            self.checkpoints,
            # The tokenizer learns from all text the job trains on (never valid/test).
            lambda: dataset.texts("train") + dataset.texts("unlabeled"),
            rank=self.dist.rank,
            barrier=self.dist.barrier,
            workdir=self.work,
            fetch_pretrained=self.fetch_pretrained,
        )

    def fetch_pretrained(self, uri: str, dest: Path, field: str) -> Path:
        """The local directory of a pretrained model or tokenizer URI; an `hf://` one comes
        through the job's store on a cluster (`ulmfit_trainer.hub_mirror`), once per job."""
        from ulmfit_trainer.hub_mirror import HubMirror

        if self._hub is None:
            self._hub = HubMirror(self.checkpoints, self.config.s3, self.dist)
        return self._hub.fetch(uri, dest, field)

    def check_tokenizer(self, stage: StageName, tok_hash: str) -> None:
        """Weights and vocabulary must belong together: compare the hash ``stage`` recorded."""
        final = self.checkpoints.final(stage.value)
        expected = final.meta.get("tokenizerHash") if final is not None else None
        if expected and tok_hash and expected != tok_hash:
            raise PermanentError(
                f"stage {stage.value} was trained with another tokenizer ({expected[:12]}) than "
                f"this job's ({tok_hash[:12]})"
            )

    def init_dir(self, stage: StageName) -> Path:
        """Download ``stage``'s final checkpoint (the model it exported) and return its folder."""
        target = self.work / f"init-{stage.value}"
        try:
            self.checkpoints.load(stage.value, target, tag="final")
        except NoCheckpoint:
            raise PermanentError(
                f"stage {self.stage} starts from stage {stage.value}, which has no final "
                f"checkpoint under {self.checkpoints.store.uri(self.checkpoints.run)}"
            ) from None
        return target


def _quiet_transformers() -> None:
    """Keep stdout/stderr to our own lines: no per-file progress bars or advisory warnings."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
