"""Pure: batch/v1 Jobs, the child of a single-process stage: `evaluate`, and `tune` with backend
`pod` (one pod starts a Ray head and runs the whole sweep).

Built by `stage_job` (`evaluate_job` or `tune_job`), read back by `observe` (its conditions and
pod counts), stopped through `spec.suspend`.
"""

from __future__ import annotations

import math

from ulmfit_trainer.config import StageName, TuneSpec

from ulmfit_operator.api import ULMFiTJobSpec
from ulmfit_operator.children.common import (
    DASHBOARD_PORT,
    ROLE_RAY_HEAD,
    Attempt,
    Body,
    Child,
    ChildPhase,
    _dashboard_port,
    _env,
    _failure_message,
    _present,
    _true_conditions,
    read_child,
    single_process_command,
)

JOB_API_VERSION = "batch/v1"
JOB_KIND = "Job"
EVALUATE_CONTAINER = "evaluate"
TUNE_CONTAINER = "tune"


def stage_job(attempt: Attempt) -> Body:
    """The Job for one attempt of a single-process stage: the tune pod, or evaluate."""
    return tune_job(attempt) if attempt.stage.kind == StageName.TUNE else evaluate_job(attempt)


def _batch_job(attempt: Attempt, container: Body, role: str | None = None) -> Body:
    return {
        "apiVersion": JOB_API_VERSION,
        "kind": JOB_KIND,
        "metadata": attempt.metadata(),
        "spec": _present(
            {
                "backoffLimit": 0,
                # Queued: Kueue unsuspends the Job when it admits it.
                "suspend": True if attempt.queue else None,
                "template": attempt.pod_template(container, role),
            }
        ),
    }


def evaluate_job(attempt: Attempt) -> Body:
    """The batch/v1 Job for one attempt of the single-process `evaluate` stage."""
    gpus = min(attempt.spec.resources.gpus_per_worker, 1)
    command = single_process_command(attempt.stage.kind.value)
    return _batch_job(attempt, attempt.container(EVALUATE_CONTAINER, command, gpus))


def tune_gpus(tune: TuneSpec, spec: ULMFiTJobSpec) -> int:
    """GPUs of the pod that runs a whole sweep (backend `pod`).

    With `concurrentTrials` set, enough for that many trials at once:
    ceil(gpusPerTrial x concurrentTrials). Otherwise `resources.gpusPerWorker` (Ray runs as many
    trials as fit), but at least enough for one trial.
    """
    if tune.gpus_per_trial <= 0:
        return 0
    if tune.concurrent_trials is not None:
        return math.ceil(tune.gpus_per_trial * tune.concurrent_trials)
    return max(spec.resources.gpus_per_worker, math.ceil(tune.gpus_per_trial))


def tune_job(attempt: Attempt) -> Body:
    """Backend `pod`: a batch/v1 Job whose one pod starts a Ray head and runs the whole sweep.

    Its dashboard listens on the pod's loopback only: the job-submission API behind it has no
    authentication, and nothing but `kubectl port-forward` (which connects inside the pod) needs
    it."""
    tune = attempt.stage.config.tune
    assert tune is not None  # a tune stage's config always carries its sweep
    env = [
        _env("ULMFIT_RAY_DASHBOARD_HOST", "127.0.0.1"),
        _env("ULMFIT_RAY_DASHBOARD_PORT", str(DASHBOARD_PORT)),
    ]
    container = attempt.container(
        TUNE_CONTAINER,
        single_process_command(attempt.stage.kind.value),
        tune_gpus(tune, attempt.spec),
        ports=_dashboard_port(),
        extra_env=env,
    )
    return _batch_job(attempt, container, ROLE_RAY_HEAD)


def observe(body: Body) -> Child | None:
    """A Job we created, as reconcile sees it; None without our labels."""
    return read_child(body, _phase)


def _phase(spec: Body, status: Body) -> tuple[ChildPhase, str]:
    true = _true_conditions(status)
    if "Complete" in true:
        return ChildPhase.SUCCEEDED, ""
    if "Failed" in true:
        return ChildPhase.FAILED, _failure_message(true["Failed"])
    if "Suspended" in true or spec.get("suspend"):
        return ChildPhase.SUSPENDED, ""
    if status.get("active") or status.get("ready"):
        return ChildPhase.RUNNING, ""
    return ChildPhase.PENDING, ""
