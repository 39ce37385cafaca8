"""Pure: a validated job spec becomes a plan of stage configs, a DAG in topological order.

Both runners (local and operator) execute the same plan, so a stage sees the same config
wherever it runs; only the store root and the run path differ: in the cluster the run path
carries the job's UID (`<namespace>/<name>/<uid>`, so each instance of a job reads and writes
only its own checkpoints), locally it is `<namespace>/<name>` (see `ULMFiTJob.run_id`).

The order is pretrain -> finetune -> cotrain (K models per round, in parallel; each round after
the first also reads the pseudo-labels of the round before) -> tune -> classifier -> evaluate;
disabled or absent stages drop out and their dependents close over them.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from ulmfit_trainer.config import S3Settings, StageConfig, StageName

from ulmfit_operator.api import ULMFiTJob

TUNE_KEY = "tune"


def cotrain_key(model: str, round_: int) -> str:
    """`cotrain-<model>` in round 1, `cotrain-<model>-r<round>` after."""
    return f"cotrain-{model}" if round_ == 1 else f"cotrain-{model}-r{round_}"


@dataclass(frozen=True)
class PlannedStage:
    name: str
    """The stage's key in the store and in the status (`cotrain-<model>`, `classifier`, ...)."""
    kind: StageName
    """What runs: `python -m ulmfit_trainer <kind>`."""
    config: StageConfig
    distributed: bool
    """Runs on `workers` pods with torchrun (a PyTorchJob); otherwise one single-process pod."""
    depends_on: tuple[str, ...] = ()
    """Keys of the stages that must have succeeded before this one starts."""

    @property
    def init_from(self) -> str | None:
        """Key of the stage whose final checkpoint initializes the weights."""
        return self.config.init_from.value if self.config.init_from is not None else None


@dataclass(frozen=True)
class Plan:
    run: str
    """The job's run path in the store (`ULMFiTJob.run_id`): every stage's `config.run`."""
    stages: tuple[PlannedStage, ...]
    """Topologically ordered: every stage comes after all it depends on."""

    @property
    def names(self) -> list[str]:
        return [stage.name for stage in self.stages]

    def stage(self, name: str) -> PlannedStage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"stage {name!r} is not in the plan {self.names}")

    def ready(self, done: Collection[str]) -> list[PlannedStage]:
        """Stages not done whose dependencies all are, in plan order."""
        return [
            stage
            for stage in self.stages
            if stage.name not in done and all(dep in done for dep in stage.depends_on)
        ]

    def has(self, kind: StageName) -> bool:
        return any(stage.kind == kind for stage in self.stages)


def make_plan(job: ULMFiTJob, store_root: str, s3: S3Settings | None = None) -> Plan:
    """Lay out the enabled stages, each with what it depends on and starts from."""
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
    lm: StageName | None = None
    for name, lm_spec in (
        (StageName.PRETRAIN, spec.stages.pretrain),
        (StageName.FINETUNE, spec.stages.finetune),
    ):
        if lm_spec.enabled:
            config = StageConfig(stage=name, init_from=lm, lm=lm_spec, **common)
            after = (lm.value,) if lm is not None else ()
            stages.append(PlannedStage(name.value, name, config, True, after))
            lm = name
    after_lm: tuple[str, ...] = (lm.value,) if lm is not None else ()
    classifier = spec.stages.classifier
    cotrain = spec.stages.cotrain
    tune = spec.stages.tune

    previous_round: tuple[str, ...] = ()
    if cotrain is not None:
        hyper = cotrain.classifier or classifier
        for round_ in range(1, cotrain.rounds + 1):
            keys = []
            for model in cotrain.models:
                key = cotrain_key(model.name, round_)
                config = StageConfig(
                    stage=StageName.COTRAIN,
                    name=key,
                    init_from=lm,
                    classifier=hyper,
                    cotrain=cotrain,
                    cotrain_model=model.name,
                    cotrain_round=round_,
                    pseudo_labels_from=list(previous_round),
                    **common,
                )
                depends = previous_round if round_ > 1 else after_lm
                stages.append(PlannedStage(key, StageName.COTRAIN, config, True, depends))
                keys.append(key)
            previous_round = tuple(keys)
    before_classifier = previous_round or after_lm

    if tune is not None:
        config = StageConfig(
            stage=StageName.TUNE,
            name=TUNE_KEY,
            init_from=lm,
            classifier=classifier,
            cotrain=cotrain,
            pseudo_labels_from=list(previous_round),
            tune=tune,
            **common,
        )
        stages.append(PlannedStage(TUNE_KEY, StageName.TUNE, config, False, before_classifier))
        before_classifier = (TUNE_KEY,)

    stages.append(
        PlannedStage(
            StageName.CLASSIFIER.value,
            StageName.CLASSIFIER,
            StageConfig(
                stage=StageName.CLASSIFIER,
                init_from=lm,
                classifier=classifier,
                cotrain=cotrain,
                pseudo_labels_from=list(previous_round),
                tuned_by=TUNE_KEY if tune is not None else None,
                **common,
            ),
            True,
            before_classifier,
        )
    )
    stages.append(
        PlannedStage(
            StageName.EVALUATE.value,
            StageName.EVALUATE,
            StageConfig(
                stage=StageName.EVALUATE,
                init_from=StageName.CLASSIFIER,
                classifier=classifier,
                **common,
            ),
            False,
            (StageName.CLASSIFIER.value,),
        )
    )
    return Plan(run=job.run_id, stages=tuple(stages))
