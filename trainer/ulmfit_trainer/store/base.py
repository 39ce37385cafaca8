"""The `Store` interface: objects under one root, addressed by relative keys, and the key rules.

A key is a relative POSIX path (``ns/job/stage/tag/file``); checkpoint stage and tag names are
single path segments. `run_parallel` moves a directory's files on several threads. The backends
are `local.LocalStore` and `s3.S3Store`.
"""

from __future__ import annotations

import builtins
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ulmfit_trainer.config import is_store_key
from ulmfit_trainer.store.errors import ObjectNotFound, StoreError
from ulmfit_trainer.store.files import Progress, T, by_size_desc, local_files

META_FILE = "meta.json"
PROGRESS_FILE = "progress.json"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    """Key relative to the store root."""
    size: int
    sha256: str | None = None
    """Hex digest, known when this process just wrote or read the bytes."""
    modified: float | None = None
    """Last modification as POSIX seconds, when the backend reports it."""


def check_key(key: str, what: str = "key") -> str:
    """A store key is a relative POSIX path: no empty, `.` or `..` segments, no backslashes."""
    if not is_store_key(key):
        raise StoreError(f"invalid store {what} {key!r}: use a relative path like 'a/b/c'")
    return key


def check_prefix(prefix: str) -> str:
    """A listing prefix: a key, a key ending in `/`, or empty for everything."""
    stripped = prefix[:-1] if prefix.endswith("/") else prefix
    if stripped:
        check_key(stripped, what="prefix")
    return prefix


def check_name(value: str, what: str) -> str:
    if not NAME_RE.match(value) or value in (META_FILE, PROGRESS_FILE):
        raise StoreError(
            f"invalid {what} {value!r}: use 1-128 of letters, digits, '.', '_', '-',"
            f" starting with a letter or digit (and not {META_FILE!r} or {PROGRESS_FILE!r})"
        )
    return value


def join_key(*parts: str) -> str:
    return "/".join(part.strip("/") for part in parts if part.strip("/"))


class Store(ABC):
    """Objects under one root, addressed by relative keys like `ns/job/stage/tag/file`."""

    parallel_files: int = 1
    """How many files a checkpoint transfer moves at once on this backend."""

    @abstractmethod
    def uri(self, key: str = "") -> str:
        """Where `key` lives, for people and for `open_store`/`fetch` (an `s3://` URI or a
        local path); the root itself for an empty key."""

    @abstractmethod
    def put_file(
        self, key: str, path: str | Path, *, progress: Progress | None = None
    ) -> ObjectInfo:
        """Upload a local file; the result carries its size and sha256 (computed on the way)."""

    @abstractmethod
    def get_file(self, key: str, path: str | Path) -> ObjectInfo:
        """Download to `path` (replaced atomically); the result carries size and sha256 of what
        was written. Raises `ObjectNotFound`."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        """Store a small object in one piece."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Read a small object whole. Raises `ObjectNotFound`."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        """Objects whose key starts with `prefix` (string prefix, as in S3), sorted by key."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove one object; a missing one is not an error."""

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object under `prefix`; returns how many."""
        objects = self.list(prefix)
        for obj in objects:
            self.delete(obj.key)
        return len(objects)

    @abstractmethod
    def check(self) -> None:
        """Fail early, with a clear error, when the store cannot be written."""

    # Whole directories: exported models, tokenizers, datasets.

    def put_dir(
        self, prefix: str, local_dir: str | Path, *, progress: Progress | None = None
    ) -> builtins.list[ObjectInfo]:
        """Upload every file under `local_dir` to `prefix/<relative path>`."""
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise StoreError(f"{local_dir} is not a directory")
        files = local_files(local_dir)
        return run_parallel(
            [
                partial(self.put_file, join_key(prefix, rel), path, progress=progress)
                for rel, path in by_size_desc(files)
            ],
            self.parallel_files,
        )

    def get_dir(self, prefix: str, local_dir: str | Path) -> builtins.list[ObjectInfo]:
        """Download every object under `prefix/` into `local_dir`, keeping relative paths."""
        prefix = check_key(prefix.strip("/"), what="prefix")
        local_dir = Path(local_dir)
        objects = self.list(prefix + "/")
        if not objects:
            raise ObjectNotFound(f"nothing under {self.uri(prefix)}/")
        start = len(prefix) + 1
        return run_parallel(
            [
                partial(self.get_file, obj.key, local_dir / obj.key[start:])
                for obj in sorted(objects, key=lambda o: -o.size)
            ],
            self.parallel_files,
        )


def run_parallel(tasks: builtins.list[Callable[[], T]], workers: int) -> builtins.list[T]:
    """Run tasks on up to `workers` threads; results in task order; the first error wins and
    cancels what has not started."""
    if workers <= 1 or len(tasks) <= 1:
        return [task() for task in tasks]
    with ThreadPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
        futures = [pool.submit(task) for task in tasks]
        wait(futures, return_when=FIRST_EXCEPTION)
        for future in futures:
            if future.done() and future.exception() is not None:
                for other in futures:
                    other.cancel()
                break
        return [future.result() for future in futures]
