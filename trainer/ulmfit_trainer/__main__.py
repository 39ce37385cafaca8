"""``python -m ulmfit_trainer STAGE --config FILE``: the entry point of a training pod.

``python -m ulmfit_trainer predict MODEL [TEXT ...]`` classifies texts with an exported model
(see ``ulmfit_trainer.predict``).

Exit status: 0 when the stage finished (or had already finished), 1 when it failed, 2 for a bad
command line or config. A stage whose final checkpoint is already committed prints its stored
metrics and exits before torch is even imported, so rerunning a finished stage costs nothing.
The trainer looks for that final checkpoint, and resumes, only under the config's `run`: in the
cluster that path carries the job's UID (`<namespace>/<name>/<uid>`, see
`ulmfit_operator.api.ULMFiTJob.run_id`), so what an earlier job of the same name left in the
store is neither resumed nor reported finished; the local runner's run is `<namespace>/<name>`.
On success rank 0 prints one ``@metrics {json}`` line on stdout; on failure the failing rank
writes a ``failed`` ``records.StageProgress`` (the error line) as the stage's progress.
A failing run also writes its error line to the container's termination log
(``/dev/termination-log``, or ``$ULMFIT_TERMINATION_LOG``), where ``kubectl describe pod`` and
the pod's status show it; best effort, first error only, never instead of the error itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import traceback

from ulmfit_trainer.config import StageConfig, StageName

METRICS_PREFIX = "@metrics "
TERMINATION_LOG = "/dev/termination-log"
TERMINATION_LOG_ENV = "ULMFIT_TERMINATION_LOG"
log = logging.getLogger("ulmfit_trainer")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["predict"]:
        from ulmfit_trainer.predict import main as predict

        return predict(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m ulmfit_trainer", description=__doc__)
    parser.add_argument("stage", choices=[s.value for s in StageName], help="the stage to run")
    parser.add_argument("--config", required=True, help="StageConfig JSON file")
    args = parser.parse_args(argv)

    try:
        config = StageConfig.read(args.config)
    except (OSError, ValueError) as exc:
        _fail(f"error: cannot read stage config {args.config}: {exc}")
        return 2
    if config.stage.value != args.stage:
        _fail(
            f"error: {args.config} configures stage {config.stage.value!r}, "
            f"but the command line asks for {args.stage!r}"
        )
        return 2
    rank = int(os.environ.get("RANK", "0"))

    from ulmfit_trainer.records import StageProgress
    from ulmfit_trainer.store import open_checkpoints

    try:
        checkpoints = open_checkpoints(config)
        finished = checkpoints.final(config.key)
    except Exception as exc:
        _fail(f"error: cannot read the store {config.store_root}: {exc}")
        return 1
    if finished is not None:
        if rank == 0:
            print(
                f"stage {args.stage} of run {config.run} already finished: {finished.uri}",
                file=sys.stderr,
            )
            print(METRICS_PREFIX + json.dumps(finished.meta.get("metrics", {})), flush=True)
        return 0

    from ulmfit_trainer.stages import stage_runner

    try:
        metrics = stage_runner(config.stage)(config)
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}"
        log.error("stage %s failed: %s\n%s", args.stage, message, traceback.format_exc())
        from ulmfit_trainer.errors import InvalidSpec

        invalid = isinstance(exc, InvalidSpec)  # a bad spec or data: exit 2, marked in the record
        report = StageProgress(
            stage=config.key, state="failed", error=message[:1000], rank=rank,
            invalid=invalid or None,
        )  # fmt: skip
        try:
            checkpoints.write_progress(config.key, report)
        except Exception as store_exc:  # the failure itself matters more; say both
            log.warning("could not record the failure in the store: %s", store_exc)
        print(report.to_line(), flush=True)  # the local runner's follower reads it
        write_termination_message(report.error or message)
        return 2 if invalid else 1
    finally:
        _leave_process_group()
    if rank == 0:
        print(METRICS_PREFIX + json.dumps(metrics, sort_keys=True), flush=True)
    return 0


def _fail(line: str) -> None:
    print(line, file=sys.stderr)
    write_termination_message(line)


def write_termination_message(line: str, path: str | None = None) -> bool:
    """Put the error line where Kubernetes reads a container's termination message.

    Only when the file exists (the kubelet creates it; locally there is none) and nothing was
    written there yet: with several ranks in one container, the first failure is the cause and
    the later ones mostly echo it. Never raises: the failure it reports matters more. Returns
    whether it wrote.
    """
    target = path or os.environ.get(TERMINATION_LOG_ENV) or TERMINATION_LOG
    try:
        fd = os.open(target, os.O_WRONLY | os.O_APPEND)  # no O_CREAT: only where one exists
    except OSError:
        return False
    try:
        if os.fstat(fd).st_size > 0:
            return False
        # Kubernetes keeps at most 4096 bytes of it.
        os.write(fd, (line.splitlines()[0] if line else "").encode()[:4000] + b"\n")
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _leave_process_group() -> None:
    torch = sys.modules.get("torch")
    if (
        torch is not None
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
    ):
        with contextlib.suppress(Exception):
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
