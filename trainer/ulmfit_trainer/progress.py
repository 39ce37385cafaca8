"""The trainer's one progress writer: a `StageProgress` on stdout and in the store.

Every report goes two ways: one ``@progress {...}`` line on stdout (what the local runner reads)
and ``<run>/<stage>/progress.json`` (what the operator reads). The training loop
(``engine.Progress``) and a sweep's driver (``stages.sweep.Board``) both report through
`report_progress`. No torch import here: the sweep's driver has none.
"""

from __future__ import annotations

import logging

from ulmfit_trainer.records import StageProgress
from ulmfit_trainer.store import CheckpointStore

log = logging.getLogger(__name__)


def report_progress(checkpoints: CheckpointStore, progress: StageProgress) -> StageProgress:
    """Print `progress` as its stdout line, then write it as the stage's ``progress.json``.

    Progress is advisory: a store that cannot be written is logged, and the stage goes on.
    Returns `progress`.
    """
    print(progress.to_line(), flush=True)
    try:
        checkpoints.write_progress(progress.stage, progress)
    except Exception as exc:  # progress is advisory; training goes on
        log.warning("could not write progress: %s", exc)
    return progress
