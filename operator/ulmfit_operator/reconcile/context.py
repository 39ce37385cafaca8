"""What steps 4 to 10 of a reconcile share: `Context`, the plan, the stages done, the ready
stages and their attempts, and the ways a reconcile ends (`fail`, `finish`, `decide`) with the
stage entries it writes (`write_stages`). The steps themselves are functions of a `Context`, one
module per group: `plan_walk` (4), `guards` (5 to 8), `attempts` (9), `report` (10)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Literal

from ulmfit_trainer.config import S3Settings, StageName
from ulmfit_trainer.records import StageProgress

from ulmfit_operator.api import (
    Metadata,
    StageState,
    TrainingBackend,
    ULMFiTJob,
    ULMFiTJobSpec,
    queue_name,
)
from ulmfit_operator.children import Cluster
from ulmfit_operator.decisions import Decision, Event, StageGauges
from ulmfit_operator.observations import FinalCheckpoint, Observation
from ulmfit_operator.plan import PlannedStage, make_plan
from ulmfit_operator.policy import PodNetwork
from ulmfit_operator.reconcile.job import SeenJob
from ulmfit_operator.stages import StageInfo, StageRun, done_entry, stage_entry, succeeded_events
from ulmfit_operator.status import ConditionType, StageStatus, format_time

LM_STAGES = (StageName.PRETRAIN, StageName.FINETUNE)
"""Listed in status.stages even when disabled (as Skipped), ahead of the planned stages."""


class Context:
    """Steps 4 to 10 for a valid job that has not finished: the plan, the stages done, the ready
    stages and their attempts. The status, actions and events it decides go to `job`."""

    def __init__(
        self,
        job: SeenJob,
        spec: ULMFiTJobSpec,
        s3: S3Settings,
        observation: Observation,
        cluster: Cluster,
        training: TrainingBackend,
        network: PodNetwork | None,
    ):
        self.job = job
        self.spec = spec
        self.policy = spec.run_policy
        self.s3 = s3
        self.observation = observation
        self.cluster = cluster
        self.training = training
        """What the distributed stages run as (resolved: never `auto`)."""
        self.network = network
        """The NetworkPolicy each attempt makes sure of (None: the operator fences no pods)."""
        self.queue = queue_name(spec, job.labels)
        """The Kueue LocalQueue that admits the children (None: they start at once)."""
        self.plan = make_plan(
            ULMFiTJob.model_validate(
                {
                    "metadata": Metadata(name=job.name, namespace=job.namespace, uid=job.uid),
                    "spec": spec,
                }
            ),
            store_root=s3.root,
            s3=s3,
        )
        self.status = job.status
        self.done: dict[str, FinalCheckpoint] = {}
        self.ready: list[PlannedStage] = []
        self.runs: dict[str, StageRun] = {}
        """The attempts of each ready stage."""
        self.progress: dict[str, StageProgress | None] = {}
        """The progress of each ready stage with a running attempt."""
        self.requeue: list[float] = []
        """When a deadline falls due (seconds from now)."""
        self.completed: list[tuple[str, float]] = []
        """Stages finished since the old status, with their duration."""
        self.gauges: tuple[StageGauges, ...] = ()
        """The ready stages' numbers for the per-job metrics (set while the job runs)."""

    @property
    def ready_names(self) -> str:
        return ", ".join(stage.name for stage in self.ready)

    # -- how a reconcile ends

    def fail(self, failing: set[str], reason: str, message: str) -> Decision:
        """Fail the job: the `failing` stages are Failed (with `message`), the other ready
        stages Pending."""
        self.write_stages(
            {
                name: run.info(StageState.FAILED, message)
                if name in failing
                else run.info(StageState.PENDING)
                for name, run in self.runs.items()
            }
        )
        self.status.current_stage = ", ".join(name for name in self.runs if name in failing)
        return self.finish(ConditionType.FAILED, reason, message)

    def finish(
        self,
        outcome: Literal[ConditionType.SUCCEEDED, ConditionType.FAILED],
        reason: str,
        message: str,
        ended_at: datetime | None = None,
    ) -> Decision:
        """The job's end: the summary condition, Running cleared, the TTL clock started."""
        failed = outcome == ConditionType.FAILED
        self.status.progress = f"Failed: {reason}" if failed else "Succeeded"
        self.status.eta = None
        self.job.clear_condition(ConditionType.QUEUED, reason, message)
        self.status.completion_time = self.status.completion_time or format_time(
            ended_at or self.job.now
        )
        self.job.set_condition(outcome, True, reason, message)
        self.job.clear_condition(ConditionType.RUNNING, reason, message)
        if failed:
            self.job.delete_active()
        self.job.events.append(Event("Warning" if failed else "Normal", reason, message))
        ttl = self.policy.ttl_seconds_after_finished
        return self.decide(
            "Failed" if failed else "Succeeded", float(ttl) if ttl is not None else None
        )

    def decide(self, state: str, requeue_after: float | None = None) -> Decision:
        """The decision, with a StageSucceeded event ahead of the others for each stage that
        succeeded since the old status."""
        self.job.events = [*succeeded_events(self.job.old, self.status), *self.job.events]
        return self.job.decide(state, requeue_after, self.completed, self.gauges)

    # -- status.stages

    def write_stages(self, infos: Mapping[str, StageInfo]) -> None:
        """One entry per stage (disabled LM stages as Skipped); notes newly finished stages."""
        planned = set(self.plan.names)
        entries = [
            (index, StageStatus(name=lm, kind=lm, state=StageState.SKIPPED))
            for index, lm in enumerate(LM_STAGES)
            if lm.value not in planned
        ]
        for position, stage in enumerate(self.plan.stages):
            order = LM_STAGES.index(stage.kind) if stage.kind in LM_STAGES else 2 + position
            old = self.job.old_stage(stage.name)
            final = self.done.get(stage.name)
            if final is None:
                entry = stage_entry(old, stage, infos.get(stage.name), self.job.now)
            else:
                entry, took = done_entry(old, stage, final, self.job.children, self.job.now)
                if took is not None:
                    self.completed.append((stage.kind.value, took))
            entries.append((order, entry))
        self.status.stages = [entry for _, entry in sorted(entries, key=lambda item: item[0])]


def current(ready: Sequence[PlannedStage]) -> str:
    """status.currentStage: the ready stages' names."""
    return ",".join(stage.name for stage in ready)
