"""Checkpoints, progress and artifacts in an object store: S3 (minio client) or a local directory.

What lives where in this package:

- `errors`: `StoreError` and its kinds.
- `files`: atomic local writes, hashing copies, directory walks (internal).
- `base`: the `Store` interface, `ObjectInfo`, the key rules.
- `local`: `LocalStore`; `s3`: `S3Store` and its retry policy (`backoff_delay`).
- `roots`: `open_store` for a root, `fetch`/`publish` for a URI, `split_s3_uri`.
- `checkpoints`: `CheckpointStore` (checkpoints and progress of one run), `open_checkpoints`.

Both backends keep the same layout under their root (a directory, or ``s3://bucket/prefix``)::

    <run>/<stage>/<tag>/<files...>     one checkpoint
    <run>/<stage>/<tag>/meta.json      its commit record, written last
    <run>/<stage>/progress.json        what the operator reads for status
    <run>/model/                       the exported model (the evaluate stage)

where ``<run>`` (``StageConfig.run``) is ``<namespace>/<job>/<uid>`` for a job in the cluster: each
instance of a job (its UID) owns its run, so one re-created under the same name never resumes
or reuses the checkpoints of the one before. The local runner's run is ``<namespace>/<job>``,
so rerunning a job file resumes by name. `CheckpointStore` only ever reads inside its run.

A checkpoint exists only once its ``meta.json`` is written, after every file it lists (with size
and sha256) is complete. The newest checkpoint is found by listing commit records, never through
a mutable pointer, so a crash in the middle of a save leaves the previous checkpoint in charge.
Loading verifies every file and falls back to the previous checkpoint when one is corrupt.

No torch import here: the operator imports this package too. Its connection settings,
`S3Settings`, live in `ulmfit_trainer.config`.
"""

from __future__ import annotations

from ulmfit_trainer.records import FORMAT_VERSION
from ulmfit_trainer.store.base import META_FILE, PROGRESS_FILE, ObjectInfo, Store
from ulmfit_trainer.store.checkpoints import (
    Checkpoint,
    CheckpointStore,
    FileEntry,
    open_checkpoints,
)
from ulmfit_trainer.store.errors import (
    CheckpointCorrupt,
    NoCheckpoint,
    ObjectNotFound,
    StoreAuthError,
    StoreError,
    StoreUnavailable,
)
from ulmfit_trainer.store.files import Progress
from ulmfit_trainer.store.local import LocalStore
from ulmfit_trainer.store.roots import fetch, open_store, publish, split_s3_uri
from ulmfit_trainer.store.s3 import S3Store, backoff_delay

__all__ = [
    "FORMAT_VERSION",
    "META_FILE",
    "PROGRESS_FILE",
    "Checkpoint",
    "CheckpointCorrupt",
    "CheckpointStore",
    "FileEntry",
    "LocalStore",
    "NoCheckpoint",
    "ObjectInfo",
    "ObjectNotFound",
    "Progress",
    "S3Store",
    "Store",
    "StoreAuthError",
    "StoreError",
    "StoreUnavailable",
    "backoff_delay",
    "fetch",
    "open_checkpoints",
    "open_store",
    "publish",
    "split_s3_uri",
]
