"""`hf://` backbones on a cluster: fetched from the Hugging Face Hub once per job, into its store.

Every process of every stage that starts from an `hf://` model or tokenizer needs the same files.
On a cluster those processes are pods on several nodes, each with an empty Hub cache: left to
themselves they would all download the model at once, at every stage and every retry. Instead,
rank 0 of the first stage that needs it downloads it (through the Hub cache, so
`HF_HUB_OFFLINE` and a mounted, pre-filled cache still apply) and copies it to
`<run>/backbones/<org>--<name>[@<revision>]/` in the job's store, the `backbone-source.json`
marker last (a copy without it is incomplete); every other process, and every later stage, reads
it from there.

A local store (`ulmfit run`) keeps reading the Hub cache itself: it is on this machine already,
and a copy would only double the disk it takes. Other URIs are fetched as `store.fetch` does.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ulmfit_trainer.backbones import HF, hf_snapshot, parse_hf_uri
from ulmfit_trainer.config import S3Settings
from ulmfit_trainer.errors import PermanentError
from ulmfit_trainer.store import CheckpointStore, fetch
from ulmfit_trainer.store.s3 import S3Store

log = logging.getLogger(__name__)

MARKER = "backbone-source.json"


def mirror_name(uri: str, field: str = "model.pretrained") -> str:
    """The store folder of an `hf://` URI: `org--name`, with `@revision` when one is pinned."""
    repo, revision = parse_hf_uri(uri, field)
    name = repo.replace("/", "--")
    return f"{name}@{revision.replace('/', '--')}" if revision else name


@dataclass
class HubMirror:
    """Local directories of a stage's pretrained URIs, `hf://` ones through the job's store.

    Every rank must ask for the same URIs in the same order: rank 0's copy ends at a collective.
    """

    checkpoints: CheckpointStore
    s3: S3Settings | None
    dist: Any  # engine.Dist
    _local: dict[str, Path] = field(default_factory=dict, repr=False)

    @property
    def mirrors(self) -> bool:
        """Whether `hf://` URIs go through the store: only a store that other machines share."""
        return isinstance(self.checkpoints.store, S3Store)

    def fetch(self, uri: str, dest: str | Path, field: str) -> Path:
        if not (uri.startswith(HF) and self.mirrors):
            return fetch(uri, dest, self.s3, field=field)
        if uri in self._local:
            return self._local[uri]
        prefix = self.ensure(uri, field)
        dest = Path(dest)
        self.checkpoints.store.get_dir(prefix, dest)
        self._local[uri] = dest
        return dest

    def ensure(self, uri: str, field: str) -> str:
        """The store prefix of the job's copy of ``uri``, made by rank 0 if it is not there yet."""
        store = self.checkpoints.store
        prefix = self.checkpoints.artifact_key("backbones", mirror_name(uri, field))
        marker = f"{prefix}/{MARKER}"
        copied = False
        if self.dist.is_main:
            try:
                copied = store.exists(marker) or self._copy(uri, field, prefix)
            finally:
                # Rank 0 failing still reaches the collective: the others stop instead of waiting.
                self.dist.broadcast(copied)
        elif not self.dist.broadcast(None):
            raise PermanentError(f"{field}: rank 0 could not copy {uri} into the job's store")
        return prefix

    def _copy(self, uri: str, field: str, prefix: str) -> bool:
        snapshot = hf_snapshot(uri, field)
        # The Hub cache's snapshot files are links into its blob store: copy what they point to.
        files = sorted(path for path in snapshot.rglob("*") if path.is_file())
        store = self.checkpoints.store
        for path in files:
            store.put_file(f"{prefix}/{path.relative_to(snapshot).as_posix()}", path)
        size = sum(path.stat().st_size for path in files)
        with tempfile.TemporaryDirectory(prefix="ulmfit-mirror-") as tmp:
            source = Path(tmp) / MARKER
            source.write_text(json.dumps({"uri": uri, "files": len(files), "bytes": size}))
            store.put_file(f"{prefix}/{MARKER}", source)
        log.info(
            "%s copied to %s (%d files, %.1f MB)", uri, store.uri(prefix), len(files), size / 1e6
        )
        return True
