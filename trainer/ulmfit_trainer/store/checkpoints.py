"""`CheckpointStore`: the checkpoints and progress of one run in a store, and `open_checkpoints`.

A checkpoint is committed by its ``meta.json`` (a `records.CheckpointRecord`), written last;
``progress.json`` holds the stage's latest `records.StageProgress`.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from ulmfit_trainer.config import StageConfig
from ulmfit_trainer.records import (
    CheckpointFile,
    CheckpointRecord,
    StageProgress,
    load_progress,
    now_iso,
    parse_checkpoint_record,
)
from ulmfit_trainer.store.base import (
    META_FILE,
    NAME_RE,
    PROGRESS_FILE,
    ObjectInfo,
    Store,
    check_key,
    check_name,
    join_key,
    run_parallel,
)
from ulmfit_trainer.store.errors import CheckpointCorrupt, NoCheckpoint, ObjectNotFound, StoreError
from ulmfit_trainer.store.files import Progress, by_size_desc, local_files
from ulmfit_trainer.store.roots import open_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileEntry:
    path: str
    """Path relative to the checkpoint directory, with `/` separators."""
    size: int
    sha256: str


@dataclass(frozen=True)
class Checkpoint:
    stage: str
    tag: str
    step: int
    phase: str | int | None
    uri: str
    """Where the checkpoint lives: `s3://bucket/prefix/ns/job/stage/tag` or a local path."""
    meta: dict[str, Any]
    """The caller's metadata (resolved config, tokenizer hash, code version, ...)."""
    files: tuple[FileEntry, ...]
    final: bool = False
    created_at: str = ""
    key: str = field(default="", repr=False)
    """Store key of the checkpoint directory."""

    @property
    def size(self) -> int:
        return sum(entry.size for entry in self.files)


class CheckpointStore:
    """Checkpoints and progress of one run in a store (`<namespace>/<job>/<uid>`; the local
    runner's: `<namespace>/<job>`)."""

    def __init__(self, store: Store, run: str):
        self.store = store
        self.run = check_key(run.strip("/"), what="run")

    def __repr__(self) -> str:
        return f"CheckpointStore({self.store!r}, {self.run!r})"

    def _stage_key(self, stage: str) -> str:
        return f"{self.run}/{check_name(stage, 'stage')}"

    def _tag_key(self, stage: str, tag: str) -> str:
        return f"{self._stage_key(stage)}/{check_name(tag, 'tag')}"

    def artifact_key(self, *parts: str) -> str:
        """Store key of an artifact of this run, e.g. `artifact_key("model")`."""
        return check_key(join_key(self.run, *parts))

    def artifact_uri(self, *parts: str) -> str:
        return self.store.uri(self.artifact_key(*parts))

    # -- save

    def save(
        self,
        stage: str,
        tag: str,
        local_dir: str | Path,
        meta: Mapping[str, Any] | None = None,
        final: bool = False,
        *,
        step: int | None = None,
        phase: str | int | None = None,
        progress: Progress | None = None,
    ) -> Checkpoint:
        """Upload the files under `local_dir` as checkpoint `tag` of `stage`, then commit it.

        `step` and `phase` default to `meta["step"]` and `meta["phase"]`. Saving a tag again
        replaces it: its commit record is removed first, so the old files are never mixed with
        the new ones under a valid commit.
        """
        self.store.delete(f"{self._tag_key(stage, tag)}/{META_FILE}")
        entries = self.upload(stage, tag, local_dir, progress=progress)
        return self.commit(stage, tag, entries, meta, final, step=step, phase=phase)

    def upload(
        self, stage: str, tag: str, local_dir: str | Path, *, progress: Progress | None = None
    ) -> builtins.list[FileEntry]:
        """Upload the files under `local_dir` into checkpoint `tag` without committing it.

        Several processes (ranks on different nodes) may each upload their own files into one
        tag; one of them then commits the union of the entries with `commit`.
        """
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise StoreError(f"checkpoint directory {local_dir} does not exist")
        files = local_files(local_dir)
        if any(rel == META_FILE for rel, _ in files):
            raise StoreError(f"{local_dir} holds a {META_FILE}, a name the store reserves")
        base = self._tag_key(stage, tag)
        ordered = by_size_desc(files)
        infos = run_parallel(
            [
                partial(self.store.put_file, f"{base}/{rel}", path, progress=progress)
                for rel, path in ordered
            ],
            self.store.parallel_files,
        )
        return sorted(
            (
                FileEntry(rel, info.size, info.sha256 or "")
                for (rel, _), info in zip(ordered, infos, strict=True)
            ),
            key=lambda e: e.path,
        )

    def commit(
        self,
        stage: str,
        tag: str,
        files: Iterable[FileEntry],
        meta: Mapping[str, Any] | None = None,
        final: bool = False,
        *,
        step: int | None = None,
        phase: str | int | None = None,
    ) -> Checkpoint:
        """Make uploaded `files` checkpoint `tag` of `stage`: write its `meta.json` (last), then
        delete any object under the tag that `files` does not list (an earlier save's leftovers).
        """
        meta = dict(meta or {})
        step = int(step if step is not None else meta.get("step", 0))
        phase = phase if phase is not None else meta.get("phase")
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"checkpoint meta is not JSON-serializable: {exc}") from exc
        entries = tuple(sorted(set(files), key=lambda e: e.path))
        base = self._tag_key(stage, tag)
        meta_key = f"{base}/{META_FILE}"
        try:
            record = CheckpointRecord(
                stage=stage,
                tag=tag,
                step=step,
                phase=phase,
                final=final,
                created_at=now_iso(),
                meta=meta,
                files=[CheckpointFile(path=e.path, size=e.size, sha256=e.sha256) for e in entries],
            )
        except ValueError as exc:  # pydantic's ValidationError: a phase of another type, say
            raise StoreError(f"invalid checkpoint record for {stage}/{tag}: {exc}") from exc
        self.store.put_bytes(meta_key, record.to_json().encode())

        listed = {f"{base}/{e.path}" for e in entries} | {meta_key}
        for obj in self.store.list(base + "/"):
            if obj.key not in listed:
                self.store.delete(obj.key)

        checkpoint = Checkpoint(
            stage,
            tag,
            step,
            phase,
            self.store.uri(base),
            meta,
            entries,
            final,
            record.created_at,
            base,
        )
        log.info(
            "saved checkpoint %s (%d files, %.1f MB)",
            checkpoint.uri,
            len(entries),
            checkpoint.size / 1e6,
        )
        return checkpoint

    # -- find

    def _read_record(self, stage: str, tag: str) -> Checkpoint:
        base = self._tag_key(stage, tag)
        raw = self.store.get_bytes(f"{base}/{META_FILE}")
        try:
            record = parse_checkpoint_record(raw)
            # Paths are checked like keys: a record can never make `load` write outside its dir.
            files = tuple(
                FileEntry(check_key(f.path, "path"), f.size, f.sha256) for f in record.files
            )
        except (ValueError, StoreError) as exc:
            raise CheckpointCorrupt(
                f"{self.store.uri(base)}/{META_FILE} is unreadable: {exc}"
            ) from exc
        return Checkpoint(
            stage=stage,
            tag=tag,
            step=record.step,
            phase=record.phase,
            uri=self.store.uri(base),
            meta=record.meta,
            files=files,
            final=record.final,
            created_at=record.created_at,
            key=base,
        )

    def _tags(self, stage: str) -> tuple[set[str], dict[str, builtins.list[ObjectInfo]]]:
        """(committed tags, every tag's objects) under the stage."""
        stage_key = self._stage_key(stage)
        committed: set[str] = set()
        objects: dict[str, builtins.list[ObjectInfo]] = {}
        for obj in self.store.list(stage_key + "/"):
            rest = obj.key[len(stage_key) + 1 :]
            tag, sep, name = rest.partition("/")
            if not sep or not NAME_RE.match(tag):
                continue  # progress.json, other stage-level objects, names this store never makes
            objects.setdefault(tag, []).append(obj)
            if name == META_FILE:
                committed.add(tag)
        return committed, objects

    def committed(self, stage: str) -> builtins.list[Checkpoint]:
        """Committed checkpoints of `stage`, oldest first by (step, tag)."""
        tags, _ = self._tags(stage)
        found = []
        for tag in tags:
            try:
                found.append(self._read_record(stage, tag))
            except ObjectNotFound:
                continue  # pruned between the listing and the read
            except CheckpointCorrupt as exc:
                log.warning("ignoring checkpoint: %s", exc)
        return sorted(found, key=lambda c: (c.step, c.tag))

    def latest(self, stage: str) -> Checkpoint | None:
        found = self.committed(stage)
        return found[-1] if found else None

    def final(self, stage: str) -> Checkpoint | None:
        """The stage's newest final checkpoint: the stage is finished once it exists.

        Not `latest(...).final`: a final saved at the same step as a phase checkpoint may sort
        before it by tag.
        """
        finals = [checkpoint for checkpoint in self.committed(stage) if checkpoint.final]
        return finals[-1] if finals else None

    # -- load

    def load(self, stage: str, local_dir: str | Path, tag: str | None = None) -> Checkpoint:
        """Download and verify a checkpoint into `local_dir`: the newest committed one, or `tag`.

        Without a tag, a corrupt checkpoint (a file missing, or its size or sha256 not what
        meta.json says) is reported with a warning and the previous committed one is tried.
        Raises `NoCheckpoint` when there is none, `CheckpointCorrupt` when none verifies.
        """
        local_dir = Path(local_dir)
        found = self.committed(stage)
        where = self.store.uri(self._stage_key(stage))
        if tag is not None:
            candidates = [c for c in found if c.tag == tag]
            if not candidates:
                raise NoCheckpoint(f"no committed checkpoint {tag!r} under {where}")
        else:
            candidates = list(reversed(found))
            if not candidates:
                raise NoCheckpoint(f"no committed checkpoint under {where}")
        problems = []
        for index, checkpoint in enumerate(candidates):
            try:
                self._download(checkpoint, local_dir)
                return checkpoint
            except CheckpointCorrupt as exc:
                problems.append(str(exc))
                if index + 1 < len(candidates):
                    log.warning(
                        "checkpoint %s is corrupt (%s); falling back to the previous committed "
                        "checkpoint %s",
                        checkpoint.uri,
                        exc,
                        candidates[index + 1].uri,
                    )
        raise CheckpointCorrupt(f"no checkpoint under {where} verifies: " + "; ".join(problems))

    def _download(self, checkpoint: Checkpoint, local_dir: Path) -> None:
        local_dir.mkdir(parents=True, exist_ok=True)
        staging = local_dir / f".incoming-{uuid.uuid4().hex[:12]}"
        try:

            def get(entry: FileEntry) -> None:
                key = f"{checkpoint.key}/{entry.path}"
                try:
                    info = self.store.get_file(key, staging / entry.path)
                except ObjectNotFound:
                    raise CheckpointCorrupt(f"{self.store.uri(key)} is missing") from None
                if info.size != entry.size:
                    raise CheckpointCorrupt(
                        f"{self.store.uri(key)} has {info.size} bytes, meta.json says {entry.size}"
                    )
                if info.sha256 != entry.sha256:
                    raise CheckpointCorrupt(
                        f"{self.store.uri(key)} has sha256 {info.sha256}, meta.json says "
                        f"{entry.sha256}"
                    )

            ordered = sorted(checkpoint.files, key=lambda e: -e.size)
            run_parallel(
                [partial(get, entry) for entry in ordered],
                self.store.parallel_files,
            )
            for entry in checkpoint.files:
                target = local_dir / entry.path
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / entry.path, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # -- retention

    def prune(
        self,
        stage: str,
        keep_last: int,
        keep_final: bool = True,
        *,
        incomplete_older_than: float | None = 3600.0,
    ) -> builtins.list[str]:
        """Delete old checkpoints of `stage`; returns the deleted tags.

        Keeps the newest `keep_last` committed checkpoints (at least one: the newest is never
        deleted) and, with `keep_final`, every final one. Uncommitted leftovers of crashed saves
        are deleted once their newest object is older than `incomplete_older_than` seconds
        (None keeps them). A commit record goes first, so a crash mid-prune never leaves a
        committed checkpoint with missing files.
        """
        found = self.committed(stage)
        keep = {c.tag for c in found[-max(1, keep_last) :]}
        if keep_final:
            keep |= {c.tag for c in found if c.final}
        deleted = []
        for checkpoint in found:
            if checkpoint.tag in keep:
                continue
            self.store.delete(f"{checkpoint.key}/{META_FILE}")
            self.store.delete_prefix(checkpoint.key + "/")
            deleted.append(checkpoint.tag)
        if incomplete_older_than is not None:
            committed_tags, objects = self._tags(stage)
            cutoff = time.time() - incomplete_older_than
            for tag, objs in objects.items():
                if tag in committed_tags:
                    continue
                newest = max((o.modified or 0.0) for o in objs)
                if newest <= cutoff:
                    self.store.delete_prefix(f"{self._tag_key(stage, tag)}/")
                    deleted.append(tag)
        if deleted:
            log.info("pruned %s/%s: %s", self.run, stage, ", ".join(deleted))
        return deleted

    # -- progress

    def write_progress(self, stage: str, progress: StageProgress) -> StageProgress:
        """Write `progress` as `<run>/<stage>/progress.json`; returns what was written."""
        key = f"{self._stage_key(stage)}/{PROGRESS_FILE}"
        self.store.put_bytes(key, (progress.to_json() + "\n").encode())
        return progress

    def read_progress(self, stage: str) -> StageProgress | None:
        """The stage's latest progress; `None` when there is none or it is unreadable (with a
        warning: progress is advisory, a bad record must not stop its reader)."""
        key = f"{self._stage_key(stage)}/{PROGRESS_FILE}"
        try:
            raw = self.store.get_bytes(key)
        except ObjectNotFound:
            return None
        try:
            return load_progress(raw)
        except ValueError as exc:
            log.warning("ignoring unreadable %s: %s", self.store.uri(key), exc)
            return None


def open_checkpoints(config: StageConfig) -> CheckpointStore:
    """The checkpoint store of a stage's run: its store root (with its S3 settings) and run."""
    return CheckpointStore(open_store(config.store_root, config.s3), config.run)
