"""Pure: a validated job spec becomes an ordered plan of stage configs.

Both runners (local and operator) execute the same plan, so a stage sees the same config
wherever it runs; only the store root differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ulmfit_trainer.config import StageConfig, StageName
from ulmfit_trainer.store import S3Settings

from ulmfit_operator.api import ULMFiTJob


@dataclass(frozen=True)
class PlannedStage:
    name: StageName
    config: StageConfig
    distributed: bool
    """Runs on `workers` pods with torchrun (a PyTorchJob); otherwise one single-process pod."""

    @property
    def depends_on(self) -> StageName | None:
        return self.config.init_from


@dataclass(frozen=True)
class Plan:
    run: str
    stages: tuple[PlannedStage, ...]

    @property
    def names(self) -> list[StageName]:
        return [stage.name for stage in self.stages]

    def stage(self, name: StageName | str) -> PlannedStage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"stage {name!r} is not in the plan {self.names}")

    def after(self, name: StageName | str) -> PlannedStage | None:
        """The stage that runs once `name` has succeeded (None after the last)."""
        names = self.names
        index = names.index(StageName(name))
        return self.stages[index + 1] if index + 1 < len(names) else None


def make_plan(job: ULMFiTJob, store_root: str, s3: S3Settings | None = None) -> Plan:
    """Order the enabled stages and give each the checkpoint of the one before it."""
    spec = job.spec
    common: dict[str, Any] = {
        "run": job.run_id,
        "store_root": store_root,
        "s3": s3,
        "data": spec.data,
        "model": spec.model,
        "tokenizer": spec.tokenizer,
        "deepspeed": spec.deepspeed,
        "keep_last": spec.storage.keep_last,
        "progress_interval_seconds": spec.storage.progress_interval_seconds,
        "seed": spec.seed,
    }
    stages: list[PlannedStage] = []
    previous: StageName | None = None
    for name, lm in (
        (StageName.PRETRAIN, spec.stages.pretrain),
        (StageName.FINETUNE, spec.stages.finetune),
    ):
        if lm.enabled:
            config = StageConfig(stage=name, init_from=previous, lm=lm, **common)
            stages.append(PlannedStage(name, config, distributed=True))
            previous = name
    classifier = spec.stages.classifier
    stages.append(
        PlannedStage(
            StageName.CLASSIFIER,
            StageConfig(
                stage=StageName.CLASSIFIER, init_from=previous, classifier=classifier, **common
            ),
            distributed=True,
        )
    )
    stages.append(
        PlannedStage(
            StageName.EVALUATE,
            StageConfig(
                stage=StageName.EVALUATE,
                init_from=StageName.CLASSIFIER,
                classifier=classifier,
                **common,
            ),
            distributed=False,
        )
    )
    return Plan(run=job.run_id, stages=tuple(stages))
