"""Pure: a ULMFiTJob (the JSON the API server returns) as text for a terminal.

Everything here takes plain dicts and returns strings or plain values, so it is tested without
a cluster. The status is read leniently: the operator writes it, but an older or newer operator
may leave fields out or add some, and none of that may crash a `get`.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ulmfit_operator.children import DASHBOARD_PORT, LABEL_ATTEMPT, LABEL_JOB, LABEL_STAGE
from ulmfit_operator.status import parse_time

NONE = "-"
KEY_METRICS = ("accuracy", "macroF1", "majorityBaseline", "loss", "perplexity", "pseudoLabels")
"""Metrics shown first in the stages table (the rest follow, up to `MAX_METRICS`)."""
MAX_METRICS = 3
MAX_CELL = 60


# ------------------------------------------------------------------------------------ basics


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Columns padded like `kubectl get`: left-aligned, three spaces apart, no trailing blanks."""
    lines = [list(headers), *(list(row) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    return "\n".join(
        "   ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def clip(text: str, width: int = MAX_CELL) -> str:
    """One line, at most `width` characters (a cell must not break the table)."""
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def duration(seconds: float | None) -> str:
    """`45s`, `5m10s`, `3h2m`, `2d4h`, like kubectl's ages; `-` for none."""
    if seconds is None or seconds < 0:
        return NONE
    total = int(seconds)
    if total < 60:
        return f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m{secs}s" if secs and minutes < 10 else f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes}m" if minutes and hours < 10 else f"{hours}h"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours}h" if hours and days < 10 else f"{days}d"


def age(timestamp: str | None, now: datetime) -> str:
    moment = parse_time(timestamp)
    return duration((now - moment).total_seconds()) if moment else NONE


def number(value: Any, digits: int = 4) -> str:
    """A metric for people: integers as such, floats to `digits` significant figures."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return NONE if value is None else clip(str(value), 20)
    if isinstance(value, int) or (float(value).is_integer() and abs(value) >= 1):
        return str(int(value))
    return f"{value:.{digits}g}"


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def status_of(job: Mapping[str, Any]) -> dict[str, Any]:
    return _dict(job.get("status"))


def stages_of(job: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [s for s in _list(status_of(job).get("stages")) if isinstance(s, dict) and s.get("name")]


def conditions_of(job: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [c for c in _list(status_of(job).get("conditions")) if isinstance(c, dict)]


def _true(job: Mapping[str, Any], kind: str) -> bool:
    return any(c.get("type") == kind and c.get("status") == "True" for c in conditions_of(job))


# ------------------------------------------------------------------------------------ one job


def job_state(job: Mapping[str, Any]) -> str:
    """One word for the job, from its conditions: the final ones win, then why it waits."""
    for kind in ("Failed", "Succeeded", "Suspended", "Queued", "Running"):
        if _true(job, kind):
            return kind
    return "Pending"


def current_stages(job: Mapping[str, Any]) -> list[str]:
    """The stages that run now (or ran last): `status.currentStage`, else the last stage that
    had an attempt."""
    current = status_of(job).get("currentStage")
    if isinstance(current, str) and current.strip():
        return [name.strip() for name in current.split(",") if name.strip()]
    tried = [s["name"] for s in stages_of(job) if _int(s.get("attempts")) > 0]
    return tried[-1:]


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def stage_progress(stage: Mapping[str, Any]) -> dict[str, Any]:
    """The live `progress` object of a stage (empty when the operator writes none)."""
    return _dict(stage.get("progress"))


def progress_cell(stage: Mapping[str, Any]) -> str:
    """`120/400 (30%)` from the live progress; `done` for a finished stage; `-` otherwise."""
    progress = stage_progress(stage)
    step, total = progress.get("step"), progress.get("totalSteps")
    if isinstance(step, int | float) and isinstance(total, int | float) and total > 0:
        return f"{int(step)}/{int(total)} ({min(100, int(100 * step / total))}%)"
    if isinstance(step, int | float):
        return f"step {int(step)}"
    if stage.get("state") == "Succeeded":
        return "done"
    return NONE


def eta_seconds(stage: Mapping[str, Any]) -> float | None:
    value = stage_progress(stage).get("etaSeconds")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def job_eta(job: Mapping[str, Any]) -> float | None:
    """The longest ETA among the running stages (co-trained models run at once)."""
    running = set(current_stages(job))
    etas = [eta_seconds(s) for s in stages_of(job) if s["name"] in running]
    known = [eta for eta in etas if eta is not None]
    return max(known) if known else None


def attempts_cell(stage: Mapping[str, Any]) -> str:
    attempts, failures = _int(stage.get("attempts")), _int(stage.get("failures"))
    return f"{attempts} ({failures} failed)" if failures else str(attempts)


def metrics_cell(metrics: Any) -> str:
    """The key metrics first (`accuracy=0.91 macroF1=0.88`), at most `MAX_METRICS`."""
    metrics = _dict(metrics)
    keys = [k for k in KEY_METRICS if k in metrics]
    keys += sorted(k for k in metrics if k not in keys and "/" not in k)
    return " ".join(f"{key}={number(metrics[key])}" for key in keys[:MAX_METRICS]) or NONE


STAGE_HEADERS = (
    "STAGE", "STATE", "ATTEMPTS", "PROGRESS", "LOSS", "TOKENS/S", "ETA", "CHECKPOINT", "METRICS",
)  # fmt: skip


def stage_row(stage: Mapping[str, Any]) -> list[str]:
    progress = stage_progress(stage)
    tokens = progress.get("tokensPerSecond")
    return [
        str(stage["name"]),
        str(stage.get("state") or NONE),
        attempts_cell(stage),
        progress_cell(stage),
        number(progress.get("loss")) if "loss" in progress else NONE,
        number(round(tokens)) if isinstance(tokens, int | float) else NONE,
        duration(eta_seconds(stage)),
        "yes" if stage.get("checkpoint") else "no",
        metrics_cell(stage.get("metrics")),
    ]


def stages_table(job: Mapping[str, Any]) -> str:
    stages = stages_of(job)
    if not stages:
        return "(no stages in status yet: the operator has not planned the job)"
    return table(STAGE_HEADERS, (stage_row(stage) for stage in stages))


# ------------------------------------------------------------------------------------ lists

JOB_HEADERS = ("NAME", "STATE", "STAGE", "PROGRESS", "ETA", "AGE")


def job_row(job: Mapping[str, Any], now: datetime) -> list[str]:
    meta = _dict(job.get("metadata"))
    progress = status_of(job).get("progress")
    return [
        str(meta.get("name", NONE)),
        job_state(job),
        ",".join(current_stages(job)) or NONE,
        clip(progress) if isinstance(progress, str) and progress else NONE,
        duration(job_eta(job)),
        age(meta.get("creationTimestamp"), now),
    ]


def jobs_table(jobs: Sequence[Mapping[str, Any]], now: datetime) -> str:
    ordered = sorted(jobs, key=lambda j: str(_dict(j.get("metadata")).get("name", "")))
    return table(JOB_HEADERS, (job_row(job, now) for job in ordered))


# ------------------------------------------------------------------------------------ describe

CONDITION_HEADERS = ("TYPE", "STATUS", "REASON", "MESSAGE", "AGE")
EVENT_HEADERS = ("AGE", "TYPE", "REASON", "OBJECT", "MESSAGE")


def conditions_table(job: Mapping[str, Any], now: datetime) -> str:
    conditions = conditions_of(job)
    if not conditions:
        return "(none)"
    return table(
        CONDITION_HEADERS,
        (
            [
                str(c.get("type", NONE)),
                str(c.get("status", NONE)),
                str(c.get("reason") or NONE),
                clip(c.get("message") or NONE, 80),
                age(c.get("lastTransitionTime"), now),
            ]
            for c in conditions
        ),
    )


def event_time(event: Mapping[str, Any]) -> str | None:
    """When it last happened: core events carry `lastTimestamp`, events.k8s.io ones `eventTime`
    (or their series' last observation)."""
    series = _dict(event.get("series"))
    return (
        event.get("lastTimestamp")
        or series.get("lastObservedTime")
        or event.get("eventTime")
        or event.get("firstTimestamp")
        or _dict(event.get("metadata")).get("creationTimestamp")
    )


def _event_sort_key(event: Mapping[str, Any]) -> datetime:
    return parse_time(event_time(event)) or datetime.min.replace(tzinfo=UTC)


def events_table(events: Sequence[Mapping[str, Any]], now: datetime) -> str:
    """Events oldest first, newest last (as `kubectl describe` shows them)."""
    if not events:
        return "(none)"
    rows = []
    for event in sorted(events, key=_event_sort_key):
        involved = _dict(event.get("involvedObject"))
        count = _int(event.get("count"))
        when = age(event_time(event), now) + (f" (x{count})" if count > 1 else "")
        rows.append(
            [
                when,
                str(event.get("type") or NONE),
                str(event.get("reason") or NONE),
                f"{involved.get('kind', '?')}/{involved.get('name', '?')}",
                clip(event.get("message") or NONE, 100),
            ]
        )
    return table(EVENT_HEADERS, rows)


def relevant_events(
    events: Iterable[Mapping[str, Any]], objects: Iterable[tuple[str, str]]
) -> list[Mapping[str, Any]]:
    """The events about any of `objects` ((kind, name) pairs: the job and its children)."""
    wanted = set(objects)
    return [
        event
        for event in events
        if (
            str(_dict(event.get("involvedObject")).get("kind")),
            str(_dict(event.get("involvedObject")).get("name")),
        )
        in wanted
    ]


def _leaves(value: Any, prefix: str = "") -> list[str]:
    """`a.b=1` for each scalar under `value` (lists inline as JSON)."""
    if isinstance(value, dict):
        return [leaf for key, item in value.items() for leaf in _leaves(item, f"{prefix}{key}.")]
    shown = json.dumps(value, separators=(",", ":")) if isinstance(value, list) else value
    return [f"{prefix.rstrip('.')}={shown}"]


def spec_summary(job: Mapping[str, Any], width: int = 100, most: int = 3) -> list[str]:
    """Each top-level spec field's settings as `key=value`, wrapped at `width`, at most `most`
    lines a field (the full spec is `ulmfit get JOB -o yaml`)."""
    lines: list[str] = []
    for key, value in _dict(job.get("spec")).items():
        text = " ".join(_leaves(value)) if isinstance(value, dict) else str(value)
        wrapped = textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)
        if len(wrapped) > most:
            wrapped = [*wrapped[: most - 1], wrapped[most - 1] + " …"]
        indent = " " * (len(key) + 2)
        lines += [f"{key}: {wrapped[0] if wrapped else ''}", *(indent + w for w in wrapped[1:])]
    return lines


def describe(job: Mapping[str, Any], events: Sequence[Mapping[str, Any]], now: datetime) -> str:
    """Everything about one job in one view: metadata, spec, stages, conditions, events."""
    meta, status = _dict(job.get("metadata")), status_of(job)
    lines = [
        f"Name:        {meta.get('name', NONE)}",
        f"Namespace:   {meta.get('namespace', NONE)}",
        f"Created:     {meta.get('creationTimestamp', NONE)} "
        f"({age(meta.get('creationTimestamp'), now)} ago)",
        f"State:       {job_state(job)}",
        f"Stage:       {','.join(current_stages(job)) or NONE}",
        f"Progress:    {status.get('progress') or NONE}",
    ]
    eta = job_eta(job)
    if eta is not None:
        lines.append(f"ETA:         {duration(eta)}")
    lines += _result_lines(status) + _tune_lines(status)
    lines += ["Spec:", *(f"  {line}" for line in spec_summary(job))]
    sections = (
        ("Stages:", stages_table(job)),
        ("Conditions:", conditions_table(job, now)),
        ("Events:", events_table(events, now)),
    )
    for title, body in sections:
        lines += [title, *(f"  {line}" for line in body.splitlines())]
    return "\n".join(lines)


def _result_lines(status: Mapping[str, Any]) -> list[str]:
    result = _dict(status.get("result"))
    lines = []
    if result.get("modelUri"):
        lines.append(f"Model:       {result['modelUri']}")
    if result.get("testMetrics"):
        lines.append(f"Test:        {metrics_cell(result['testMetrics'])}")
    return lines


def _tune_lines(status: Mapping[str, Any]) -> list[str]:
    tune = _dict(status.get("tune"))
    if not tune:
        return []
    return [f"Dashboard:   {tune.get('dashboard', NONE)} (`ulmfit dashboard` opens it)"]


# ------------------------------------------------------------------------------------ logs


@dataclass(frozen=True)
class PodTarget:
    """Which pods `ulmfit logs` reads: a label selector and what it means, for messages."""

    selector: str
    description: str


class NoSuchStage(LookupError):
    """The `--stage` asked for is not in the job's plan."""


def log_targets(
    job: Mapping[str, Any], stage: str | None = None, all_pods: bool = False
) -> list[PodTarget]:
    """The selectors of the pods to read: the current attempt of `stage` (default: of each
    current stage); with `all_pods`, every pod of the job (of `stage`, when given)."""
    name = str(_dict(job.get("metadata")).get("name"))
    known = {s["name"]: s for s in stages_of(job)}
    if stage is not None and known and stage not in known:
        raise NoSuchStage(f"ULMFiTJob {name} has no stage {stage!r} (stages: {', '.join(known)})")
    base = f"{LABEL_JOB}={name}"
    if all_pods:
        if stage is None:
            return [PodTarget(base, f"every pod of {name}")]
        return [PodTarget(f"{base},{LABEL_STAGE}={stage}", f"every pod of stage {stage}")]
    targets = []
    for wanted in [stage] if stage is not None else current_stages(job):
        attempt = _int(_dict(known.get(wanted)).get("attempts"))
        if attempt <= 0:
            targets.append(PodTarget(f"{base},{LABEL_STAGE}={wanted}", f"stage {wanted}"))
        else:
            selector = f"{base},{LABEL_STAGE}={wanted},{LABEL_ATTEMPT}={attempt}"
            targets.append(PodTarget(selector, f"stage {wanted} attempt {attempt}"))
    return targets


def order_pods(pods: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Pods by stage, attempt, then name (a PyTorchJob's master sorts before its workers),
    each pod once."""
    seen: dict[str, dict[str, Any]] = {}
    for pod in pods:
        meta = _dict(pod.get("metadata"))
        seen.setdefault(str(meta.get("name")), dict(pod))

    def key(pod: Mapping[str, Any]) -> tuple[str, int, str]:
        meta = _dict(pod.get("metadata"))
        labels = _dict(meta.get("labels"))
        attempt = str(labels.get(LABEL_ATTEMPT, "0"))
        return (
            str(labels.get(LABEL_STAGE, "")),
            int(attempt) if attempt.isdigit() else 0,
            str(meta.get("name")),
        )

    return sorted(seen.values(), key=key)


def pod_container(pod: Mapping[str, Any], wanted: str | None = None) -> str | None:
    """The container to read: `wanted` if the pod has it, else its first (the trainer's)."""
    names = [
        str(c.get("name"))
        for c in _list(_dict(pod.get("spec")).get("containers"))
        if isinstance(c, dict)
    ]
    if wanted is not None:
        return wanted if wanted in names else None
    return names[0] if names else None


def not_started(pod: Mapping[str, Any]) -> str | None:
    """Why a pod has no log yet (`Pending: ContainerCreating`), or None once a container ran."""
    status = _dict(pod.get("status"))
    containers = [c for c in _list(status.get("containerStatuses")) if isinstance(c, dict)]
    if any(set(_dict(c.get("state"))) & {"running", "terminated"} for c in containers):
        return None
    if status.get("phase") not in (None, "Pending"):
        return None
    waiting = [_dict(_dict(c.get("state")).get("waiting")).get("reason") for c in containers]
    reasons = [str(reason) for reason in waiting if reason]
    return "Pending" + (f": {', '.join(reasons)}" if reasons else " (not scheduled or started yet)")


def prefix_line(pod: str, line: str, several: bool) -> str:
    """With several pods, each line says which pod wrote it (like `kubectl logs --prefix`)."""
    return f"[{pod}] {line}" if several else line


# ------------------------------------------------------------------------------------ dashboard


def port_forward_command(
    kubectl: str,
    namespace: str,
    service: str,
    local_port: int,
    *,
    kubeconfig: str | None = None,
    context: str | None = None,
    remote_port: int = DASHBOARD_PORT,
) -> list[str]:
    """`kubectl port-forward` to the dashboard Service, with this command's kubeconfig and
    context, bound to loopback only (the dashboard's job API has no authentication)."""
    command = [kubectl]
    if kubeconfig:
        command += ["--kubeconfig", kubeconfig]
    if context:
        command += ["--context", context]
    command += ["--namespace", namespace, "port-forward", "--address", "127.0.0.1"]
    return [*command, f"svc/{service}", f"{local_port}:{remote_port}"]


def suspend_patch(suspend: bool) -> dict[str, Any]:
    return {"spec": {"runPolicy": {"suspend": suspend}}}


def is_suspended(job: Mapping[str, Any]) -> bool:
    return _dict(_dict(job.get("spec")).get("runPolicy")).get("suspend") is True
