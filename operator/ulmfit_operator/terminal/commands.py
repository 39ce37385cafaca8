"""`ulmfit get|describe|logs|dashboard|suspend|resume`: ULMFiTJobs from the terminal.

The same commands make the kubectl plugin (`kubectl-ulmfit`, so `kubectl ulmfit get JOB`).
The Kubernetes client loads only when a command runs (it is the `operator` extra); what is
shown comes from `render`, which does no I/O.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import threading
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
import yaml

from ulmfit_operator.api import KIND
from ulmfit_operator.children import (
    JOB_API_VERSION,
    JOB_KIND,
    LABEL_JOB,
    PYTORCHJOB_API_VERSION,
    PYTORCHJOB_KIND,
    PYTORCHJOB_PLURAL,
    RAYJOB_API_VERSION,
    RAYJOB_KIND,
    RAYJOB_PLURAL,
    SERVICE_KIND,
)
from ulmfit_operator.terminal import render

if TYPE_CHECKING:
    from ulmfit_operator.terminal.kube import Cluster

EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

CHILD_KINDS = (
    (PYTORCHJOB_API_VERSION, PYTORCHJOB_PLURAL, PYTORCHJOB_KIND),
    (JOB_API_VERSION, "jobs", JOB_KIND),
    (RAYJOB_API_VERSION, RAYJOB_PLURAL, RAYJOB_KIND),
    ("v1", "pods", "Pod"),
    ("v1", "services", SERVICE_KIND),
)
"""What a job owns that events are about: its workloads, their pods, the dashboard Service."""

Kubeconfig = Annotated[
    str | None,
    typer.Option(
        "--kubeconfig",
        help="Kubeconfig file (default: $KUBECONFIG, else ~/.kube/config).",
        show_default=False,
    ),
]
Context = Annotated[
    str | None,
    typer.Option(
        "--context", help="Kubeconfig context (default: its current one).", show_default=False
    ),
]
Namespace = Annotated[
    str | None,
    typer.Option(
        "--namespace", "-n", help="Namespace (default: the context's).", show_default=False
    ),
]
JobName = Annotated[str, typer.Argument(help="The ULMFiTJob's name.", show_default=False)]


def _fail(message: str, code: int = EXIT_FAILED) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@contextlib.contextmanager
def _cluster(
    kubeconfig: str | None, context: str | None, namespace: str | None
) -> Iterator[Cluster]:
    """The API for these options; a `TerminalError` anywhere inside ends the command with its
    message and exit code 1 (no traceback)."""
    from ulmfit_operator.terminal.kube import Cluster, TerminalError, connect

    try:
        api, target = connect(kubeconfig, context, namespace)
    except TerminalError as error:
        raise _fail(str(error)) from None
    cluster = Cluster(api, target)
    try:
        yield cluster
    except TerminalError as error:
        raise _fail(str(error)) from None
    finally:
        cluster.close()


def _now() -> datetime:
    return datetime.now(UTC)


def _dump(document: Any, output: str) -> None:
    if output == "json":
        typer.echo(json.dumps(document, indent=2))
    else:
        typer.echo(yaml.safe_dump(document, sort_keys=False).rstrip("\n"))


# ------------------------------------------------------------------------------------ get


def get(
    job: Annotated[
        str | None,
        typer.Argument(
            help="A job: show its stages. Without it: list the namespace's jobs.",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Literal["json", "yaml"] | None,
        typer.Option(
            "--output", "-o", help="Print the object(s) as json or yaml.", show_default=False
        ),
    ] = None,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    namespace: Namespace = None,
) -> None:
    """List the jobs (state, stage, progress, ETA, age), or one job's stages: state, attempts,
    progress, loss, tokens/s, ETA, checkpoint and key metrics."""
    with _cluster(kubeconfig, context, namespace) as cluster:
        if job is None:
            jobs = cluster.list_jobs()
            if output:
                _dump({"apiVersion": "v1", "kind": "List", "items": jobs}, output)
            elif not jobs:
                typer.echo(f"No {KIND}s in namespace {cluster.namespace}.", err=True)
            else:
                typer.echo(render.jobs_table(jobs, _now()))
            return
        found = cluster.get_job(job)
        if output:
            _dump(found, output)
            return
        state, stages = render.job_state(found), ",".join(render.current_stages(found))
        typer.echo(
            f"{KIND} {cluster.namespace}/{job}: {state}" + (f", stage {stages}" if stages else "")
        )
        typer.echo(render.stages_table(found))


# ------------------------------------------------------------------------------------ describe


def _family(cluster: Cluster, job: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(kind, name) of the job and of everything labelled as its own that the user may list."""
    name = str(job["metadata"]["name"])
    members = [(KIND, name)]
    for api_version, plural, kind in CHILD_KINDS:
        for item in cluster.list_quietly(api_version, plural, f"{LABEL_JOB}={name}"):
            members.append((kind, str(item["metadata"]["name"])))
    return members


def describe(
    job: JobName,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    namespace: Namespace = None,
) -> None:
    """The job in one view: spec summary, stages, conditions, and the events of the job and of
    its children (workloads, pods, Service), newest last."""
    from ulmfit_operator.terminal.kube import TerminalError

    with _cluster(kubeconfig, context, namespace) as cluster:
        found = cluster.get_job(job)
        note = ""
        try:
            events = render.relevant_events(
                cluster.list_objects("v1", "events"), _family(cluster, found)
            )
        except TerminalError as error:  # describe still shows the rest
            events, note = [], f"  (events not shown: {error})"
        typer.echo(render.describe(found, events, _now()))
        if note:
            typer.echo(note)


# ------------------------------------------------------------------------------------ logs


def _find_pods(cluster: Cluster, targets: list[render.PodTarget]) -> list[dict[str, Any]]:
    pods: list[dict[str, Any]] = []
    for target in targets:
        pods += cluster.list_objects("v1", "pods", target.selector)
    return render.order_pods(pods)


def _print_log(
    cluster: Cluster,
    pod: Mapping[str, Any],
    container: str | None,
    follow: bool,
    several: bool,
    lock: threading.Lock,
) -> bool:
    """One pod's log on stdout; False (and why on stderr) when it cannot be read."""
    from ulmfit_operator.terminal.kube import TerminalError

    name = str(pod["metadata"]["name"])
    waiting = render.not_started(pod)
    if waiting is not None:  # the API server answers an empty log for it: say why instead
        with lock:
            typer.echo(f"pod {name} has no log yet: {waiting}", err=True)
        return False
    chosen = render.pod_container(pod, container)
    if chosen is None:
        with lock:
            typer.echo(f"pod {name} has no container {container!r}", err=True)
        return False
    try:
        for line in cluster.stream_log(name, chosen, follow):
            with lock:
                typer.echo(render.prefix_line(name, line, several))
    except TerminalError as error:
        with lock:
            typer.echo(f"error: {error}", err=True)
        return False
    return True


def logs(
    job: JobName,
    stage: Annotated[
        str | None,
        typer.Option(
            "--stage", "-s", help="This stage (default: the current one(s)).", show_default=False
        ),
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep streaming new lines.")
    ] = False,
    all_pods: Annotated[
        bool,
        typer.Option(
            "--all-pods",
            help="Every pod of the job (of --stage), any attempt, not only the current attempt's.",
        ),
    ] = False,
    container: Annotated[
        str | None,
        typer.Option(
            "--container",
            "-c",
            help="Container (default: each pod's first, the trainer).",
            show_default=False,
        ),
    ] = None,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    namespace: Namespace = None,
) -> None:
    """The logs of the current attempt's pods (from the job's status); lines are prefixed with
    the pod's name when there are several pods."""
    with _cluster(kubeconfig, context, namespace) as cluster:
        found = cluster.get_job(job)
        try:
            targets = render.log_targets(found, stage, all_pods)
        except render.NoSuchStage as error:
            raise _fail(f"{error} in namespace {cluster.namespace}") from None
        if not targets:
            raise _fail(f"{KIND} {cluster.namespace}/{job} has not started a stage yet: no pods")
        pods = _find_pods(cluster, targets)
        if not pods:
            wanted = "; ".join(t.description for t in targets)
            raise _fail(
                f"no pods of {KIND} {cluster.namespace}/{job} ({wanted}): the attempt has not "
                "started its pods yet, or they are gone (--all-pods shows any attempt's)"
            )
        if not _stream_all(cluster, pods, container, follow):
            raise typer.Exit(EXIT_FAILED)


def _stream_all(
    cluster: Cluster, pods: list[dict[str, Any]], container: str | None, follow: bool
) -> bool:
    """Each pod's log; followed pods stream at once (one thread each). True if any was read."""
    several, lock = len(pods) > 1, threading.Lock()
    if not follow or not several:
        results = [_print_log(cluster, pod, container, follow, several, lock) for pod in pods]
        return any(results)
    results = []

    def read(pod: dict[str, Any]) -> None:
        results.append(_print_log(cluster, pod, container, follow, several, lock))

    # Daemon threads: Ctrl-C ends the command without waiting for the streams to close.
    threads = [threading.Thread(target=read, args=(pod,), daemon=True) for pod in pods]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    return any(results)


# ------------------------------------------------------------------------------------ dashboard


def dashboard(
    job: JobName,
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Local port.")] = 8265,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    namespace: Namespace = None,
) -> None:
    """Open the tune stage's Ray dashboard at http://localhost:PORT with `kubectl port-forward`
    (to the Service in status.tune); Ctrl-C stops it."""
    with _cluster(kubeconfig, context, namespace) as cluster:
        found = cluster.get_job(job)
        target = cluster.target
    tune = render.status_of(found).get("tune") or {}
    service = tune.get("service") if isinstance(tune, dict) else None
    if not service:
        raise _fail(
            f"{KIND} {target.namespace}/{job} has no Ray dashboard (status.tune is empty: its "
            "tune stage has not started, or it has none)"
        )
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise _fail("kubectl not found on PATH: `dashboard` runs `kubectl port-forward`")
    command = render.port_forward_command(
        kubectl, target.namespace, str(service), port, kubeconfig=target.kubeconfig,
        context=target.context,
    )  # fmt: skip
    typer.echo(f"Ray dashboard of {KIND} {target.namespace}/{job}: http://localhost:{port}")
    typer.echo(f"running: {' '.join(command)}  (Ctrl-C stops it)")
    code = _port_forward(command)
    if code == EXIT_INTERRUPTED:
        typer.echo("port-forward stopped")
        return
    if code:
        raise _fail(
            f"kubectl port-forward to svc/{service} in namespace {target.namespace} exited "
            f"with status {code}"
        )


def _port_forward(command: list[str]) -> int:
    """Run kubectl, relaying its output, until it exits or Ctrl-C (then `EXIT_INTERRUPTED`)."""
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        for line in process.stdout:
            typer.echo(line.rstrip("\n"), err=True)
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        return EXIT_INTERRUPTED


# ------------------------------------------------------------------------------------ suspend


def _set_suspend(
    job: str, suspend: bool, kubeconfig: str | None, context: str | None, namespace: str | None
) -> None:
    verb = "suspended" if suspend else "resumed"
    with _cluster(kubeconfig, context, namespace) as cluster:
        found = cluster.get_job(job)
        who = f"{KIND} {cluster.namespace}/{job}"
        if render.is_suspended(found) == suspend:
            typer.echo(
                f"{who} is already {'suspended' if suspend else 'not suspended'}; nothing changed"
            )
            return
        cluster.patch_job(job, render.suspend_patch(suspend))
    what = (
        "the operator stops its running stages and keeps their checkpoints"
        if suspend
        else "the operator restarts it from its last checkpoints"
    )
    typer.echo(f"{who} {verb}: spec.runPolicy.suspend={str(suspend).lower()} ({what})")


def suspend(
    job: JobName,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    namespace: Namespace = None,
) -> None:
    """Suspend the job (spec.runPolicy.suspend=true): running stages stop, checkpoints stay."""
    _set_suspend(job, True, kubeconfig, context, namespace)


def resume(
    job: JobName,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    namespace: Namespace = None,
) -> None:
    """Resume a suspended job (spec.runPolicy.suspend=false): it continues from its checkpoints."""
    _set_suspend(job, False, kubeconfig, context, namespace)


# ------------------------------------------------------------------------------------ wiring

COMMANDS = (get, describe, logs, dashboard, suspend, resume)


def register(app: typer.Typer) -> None:
    """Add the terminal commands to `app` (`ulmfit`, and the kubectl plugin)."""
    for command in COMMANDS:
        app.command()(command)


plugin = typer.Typer(
    name="kubectl ulmfit",
    help="ULMFiTJobs from kubectl: get, describe, logs, dashboard, suspend, resume.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
register(plugin)


def plugin_main() -> None:
    """`kubectl-ulmfit`: kubectl runs it for `kubectl ulmfit ...`."""
    plugin(prog_name="kubectl ulmfit")
