"""Checkpoints, progress and artifacts in an object store: S3 (minio client) or a local directory.

Both backends keep the same layout under their root (a directory, or ``s3://bucket/prefix``)::

    <namespace>/<job>/<stage>/<tag>/<files...>     one checkpoint
    <namespace>/<job>/<stage>/<tag>/meta.json      its commit record, written last
    <namespace>/<job>/<stage>/progress.json        what the operator reads for status

A checkpoint exists only once its ``meta.json`` is written, after every file it lists (with size
and sha256) is complete. The newest checkpoint is found by listing commit records, never through
a mutable pointer, so a crash in the middle of a save leaves the previous checkpoint in charge.
Loading verifies every file and falls back to the previous checkpoint when one is corrupt.

No torch import here: the operator imports this module too.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import http.client
import io
import json
import logging
import os
import random
import re
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import certifi
import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, S3Error, ServerError

from ulmfit_trainer.config import S3Settings, is_store_key
from ulmfit_trainer.errors import PermanentError, TemporaryError, UlmfitError

log = logging.getLogger(__name__)

T = TypeVar("T")
Progress = Callable[[int], None]
"""Called with the number of bytes an upload just read; bytes count again when a transfer is
retried, and the calls may come from several threads at once."""

META_FILE = "meta.json"
PROGRESS_FILE = "progress.json"
FORMAT_VERSION = 1
_MIB = 1024 * 1024
_CHUNK = 4 * _MIB
_TMP_SUFFIX = ".ulmfit-tmp"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# --------------------------------------------------------------------------------------- errors


class StoreError(UlmfitError):
    """A store operation failed."""


class ObjectNotFound(StoreError):
    """The key does not exist in the store."""


class StoreUnavailable(StoreError, TemporaryError):
    """The store could not be reached (connection errors, 5xx) and every retry is spent."""


class StoreAuthError(StoreError, PermanentError):
    """The store rejected the credentials; retrying will not help."""


class CheckpointCorrupt(StoreError, PermanentError):
    """A committed checkpoint does not match its meta.json and nothing older could be loaded."""


class NoCheckpoint(StoreError):
    """No committed checkpoint exists for the stage (or the requested tag)."""


# ---------------------------------------------------------------------------------- data types


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    """Key relative to the store root."""
    size: int
    sha256: str | None = None
    """Hex digest, known when this process just wrote or read the bytes."""
    modified: float | None = None
    """Last modification as POSIX seconds, when the backend reports it."""


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


# ------------------------------------------------------------------------------- key handling


def _check_key(key: str, what: str = "key") -> str:
    """A store key is a relative POSIX path: no empty, `.` or `..` segments, no backslashes."""
    if not is_store_key(key):
        raise StoreError(f"invalid store {what} {key!r}: use a relative path like 'a/b/c'")
    return key


def _check_prefix(prefix: str) -> str:
    """A listing prefix: a key, a key ending in `/`, or empty for everything."""
    stripped = prefix[:-1] if prefix.endswith("/") else prefix
    if stripped:
        _check_key(stripped, what="prefix")
    return prefix


def _check_name(value: str, what: str) -> str:
    if not _NAME_RE.match(value) or value in (META_FILE, PROGRESS_FILE):
        raise StoreError(
            f"invalid {what} {value!r}: use 1-128 of letters, digits, '.', '_', '-',"
            f" starting with a letter or digit (and not {META_FILE!r} or {PROGRESS_FILE!r})"
        )
    return value


def _join(*parts: str) -> str:
    return "/".join(part.strip("/") for part in parts if part.strip("/"))


def _local_files(directory: Path) -> list[tuple[str, Path]]:
    """Every file under `directory` as (relative POSIX path, path), sorted by path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames.sort()
        for name in filenames:
            path = Path(dirpath, name)
            found.append((path.relative_to(directory).as_posix(), path))
    return sorted(found)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _HashingReader:
    """A read-only file wrapper that hashes what passes through it, so one pass both uploads
    and checksums a file."""

    def __init__(self, raw: Any, progress: Progress | None = None):
        self._raw = raw
        self._progress = progress
        self.digest = hashlib.sha256()
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data: bytes = self._raw.read(size)
        if data:
            self.digest.update(data)
            self.count += len(data)
            if self._progress is not None:
                self._progress(len(data))
        return data


def _copy_hashing(src: Any, dst: Any, progress: Progress | None = None) -> tuple[int, str]:
    digest = hashlib.sha256()
    count = 0
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    while True:
        n = src.readinto(buffer)
        if not n:
            break
        chunk = view[:n]
        digest.update(chunk)
        dst.write(chunk)
        count += n
        if progress is not None:
            progress(n)
    return count, digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not every platform opens directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_path(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:12]}{_TMP_SUFFIX}")


def _write_atomic(dest: Path, fill: Callable[[Any], T], *, durable: bool) -> T:
    """Write `dest` through a temporary sibling and `os.replace`, so readers never see a partial
    file; with `durable`, fsync the file and the directory as well."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(dest)
    try:
        with open(tmp, "wb") as fh:
            result = fill(fh)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(dest.parent)
    return result


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number `attempt` (1-based): `base * 2**(attempt-1)` capped at
    `cap`, with equal jitter (half fixed, half random) so many clients do not retry in step."""
    delay = min(cap, base * 2 ** (attempt - 1))
    return delay / 2 + (rng or random).uniform(0, delay / 2)


# --------------------------------------------------------------------------------------- stores


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
        files = _local_files(local_dir)
        return _run_parallel(
            [
                partial(self.put_file, _join(prefix, rel), path, progress=progress)
                for rel, path in _by_size_desc(files)
            ],
            self.parallel_files,
        )

    def get_dir(self, prefix: str, local_dir: str | Path) -> builtins.list[ObjectInfo]:
        """Download every object under `prefix/` into `local_dir`, keeping relative paths."""
        prefix = _check_key(prefix.strip("/"), what="prefix")
        local_dir = Path(local_dir)
        objects = self.list(prefix + "/")
        if not objects:
            raise ObjectNotFound(f"nothing under {self.uri(prefix)}/")
        start = len(prefix) + 1
        return _run_parallel(
            [
                partial(self.get_file, obj.key, local_dir / obj.key[start:])
                for obj in sorted(objects, key=lambda o: -o.size)
            ],
            self.parallel_files,
        )


def _by_size_desc(files: Iterable[tuple[str, Path]]) -> builtins.list[tuple[str, Path]]:
    return sorted(files, key=lambda item: -item[1].stat().st_size)


def _run_parallel(tasks: builtins.list[Callable[[], T]], workers: int) -> builtins.list[T]:
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


class LocalStore(Store):
    """The same layout in a local directory. Writes go through a temporary file and
    `os.replace`, fsynced, so a reader never sees half a file."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*_check_key(key).split("/"))

    def uri(self, key: str = "") -> str:
        return str(self._path(key)) if key else str(self.root)

    def put_file(
        self, key: str, path: str | Path, *, progress: Progress | None = None
    ) -> ObjectInfo:
        with open(path, "rb") as src:
            size, sha = _write_atomic(
                self._path(key), lambda dst: _copy_hashing(src, dst, progress), durable=True
            )
        return ObjectInfo(key, size, sha)

    def get_file(self, key: str, path: str | Path) -> ObjectInfo:
        try:
            src = open(self._path(key), "rb")  # noqa: SIM115 - closed below
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"{self.uri(key)} does not exist") from None
        with src:
            size, sha = _write_atomic(
                Path(path), lambda dst: _copy_hashing(src, dst), durable=False
            )
        return ObjectInfo(key, size, sha)

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        _write_atomic(self._path(key), lambda dst: dst.write(data), durable=True)
        return ObjectInfo(key, len(data), hashlib.sha256(data).hexdigest())

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"{self.uri(key)} does not exist") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        _check_prefix(prefix)
        head, _, _ = prefix.rpartition("/")
        base = self.root.joinpath(*head.split("/")) if head else self.root
        if not base.is_dir():
            return []
        found = []
        for dirpath, _dirs, filenames in os.walk(base):
            for name in filenames:
                if name.endswith(_TMP_SUFFIX):
                    continue
                path = Path(dirpath, name)
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    stat = path.stat()
                    found.append(ObjectInfo(key, stat.st_size, modified=stat.st_mtime))
        return sorted(found, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        parent = path.parent
        while parent != self.root and self.root in parent.parents:
            try:
                parent.rmdir()
            except OSError:  # not empty (or gone): stop climbing
                break
            parent = parent.parent

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe{_TMP_SUFFIX}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StoreError(f"store directory {self.root} is not writable: {exc}") from exc


# S3 error codes that mean "these credentials are not accepted here".
_AUTH_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "AllAccessDisabled",
    }
)
_RETRY_CODES = frozenset(
    {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "OperationAborted"}
)
_NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
)


class _Missing(Exception):
    """Internal: the object (or its bucket) is not there."""

    def __init__(self, bucket: bool):
        self.bucket = bucket


class _Retryable(Exception):
    """Internal: a transfer went wrong in a way that a retry may fix (e.g. a short read)."""


_RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (*_NETWORK_ERRORS, _Retryable)


class S3Store(Store):
    """Objects in an S3 bucket under a key prefix, through the minio client.

    Files go up as streaming multipart uploads (`partSizeMb` parts, `parallelUploads` at a time),
    hashed on the way; downloads stream to disk in chunks, so memory stays bounded whatever the
    file size. Connection errors and 5xx answers are retried with exponential backoff and jitter;
    rejected credentials are not.
    """

    def __init__(self, settings: S3Settings, *, client: Minio | None = None):
        self.settings = settings
        self.bucket = settings.bucket
        self.prefix = settings.prefix
        self.parallel_files = settings.parallel_files
        self._anonymous = False
        self._client = client or self._make_client(settings)

    def __repr__(self) -> str:
        return f"S3Store({self.settings.host!r}, {self.uri()!r})"

    def _make_client(self, settings: S3Settings) -> Minio:
        access_key = os.environ.get(settings.access_key_env) or None
        secret_key = os.environ.get(settings.secret_key_env) or None
        if (access_key is None) != (secret_key is None):
            present, missing = (
                (settings.access_key_env, settings.secret_key_env)
                if access_key
                else (settings.secret_key_env, settings.access_key_env)
            )
            raise StoreAuthError(
                f"S3 credentials for {settings.host} are incomplete: {present} is set but "
                f"{missing} is empty"
            )
        self._anonymous = access_key is None
        token = os.environ.get(settings.session_token_env) or None
        connections = settings.parallel_files * settings.parallel_uploads + 4
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(
                connect=min(settings.timeout_seconds, 10.0), read=settings.timeout_seconds
            ),
            maxsize=connections,
            cert_reqs="CERT_REQUIRED" if settings.verify_tls else "CERT_NONE",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
            # No retries down here: `_call` owns the one retry policy (attempts, backoff, logs).
            retries=urllib3.Retry(total=0, redirect=0, raise_on_redirect=False),
        )
        return Minio(
            settings.host,
            access_key=access_key,
            secret_key=secret_key,
            session_token=token,
            secure=settings.use_tls,
            region=settings.region,
            http_client=http,
        )

    # -- naming

    def _name(self, key: str) -> str:
        return _join(self.prefix, _check_key(key))

    def uri(self, key: str = "") -> str:
        path = _join(self.prefix, _check_key(key)) if key else self.prefix
        return f"s3://{self.bucket}/{path}" if path else f"s3://{self.bucket}"

    def _where(self, key: str) -> str:
        """`uri` for messages: takes prefixes too and never raises."""
        return f"s3://{self.bucket}/{_join(self.prefix, key)}".rstrip("/")

    # -- the retry policy

    def _call(self, op: str, key: str, fn: Callable[[], T], *, write: bool = False) -> T:
        """Run one store operation with retries; translate failures into store errors."""
        attempts = self.settings.max_attempts
        started = time.monotonic()
        last: BaseException | None = None
        bucket_tried = make_bucket = False
        attempt = 0
        while attempt < attempts:
            attempt += 1
            try:
                if make_bucket:
                    self._make_bucket()
                    make_bucket = False
                return fn()
            except S3Error as exc:
                code = exc.code or ""
                status = getattr(exc.response, "status", 0) or 0
                if code in _AUTH_CODES:
                    raise StoreAuthError(self._auth_message(op, key, code)) from exc
                if code == "NoSuchBucket":
                    if write and self.settings.create_bucket and not bucket_tried:
                        bucket_tried = make_bucket = True
                        attempt -= 1  # a missing bucket is not a failed try
                        continue
                    raise _Missing(bucket=True) from exc
                if code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                    raise _Missing(bucket=False) from exc
                if code not in _RETRY_CODES and status < 500:
                    raise StoreError(
                        f"S3 {op} of {self._where(key)} failed at {self.settings.host}: "
                        f"{code or status}: {exc.message}"
                    ) from exc
                last = exc
            except ServerError as exc:
                last = exc
            except InvalidResponseError as exc:
                status = getattr(exc, "_code", 0) or 0
                if status < 500 and status != 429:
                    raise StoreError(
                        f"S3 {op} of {self._where(key)} at {self.settings.host} got a non-S3 answer"
                        f" (HTTP {status}); is the endpoint an S3 API? {exc}"
                    ) from exc
                last = exc
            except _RETRYABLE_ERRORS as exc:
                last = exc
            if attempt < attempts:
                delay = backoff_delay(
                    attempt, self.settings.retry_base_delay, self.settings.retry_max_delay
                )
                log.warning(
                    "S3 %s of %s failed (%s); retry %d of %d in %.1fs",
                    op,
                    self._where(key),
                    _brief(last),
                    attempt,
                    attempts - 1,
                    delay,
                )
                time.sleep(delay)
        raise StoreUnavailable(
            f"S3 endpoint {self.settings.host} unavailable: {op} of {self._where(key)} failed "
            f"{attempts} times over {time.monotonic() - started:.1f}s; last error: {_brief(last)}"
        ) from last

    def _auth_message(self, op: str, key: str, code: str) -> str:
        s = self.settings
        if self._anonymous:
            why = (
                f"no credentials are set (environment variables {s.access_key_env} and "
                f"{s.secret_key_env} are empty)"
            )
        else:
            why = (
                f"check the credentials in environment variables {s.access_key_env} and "
                f"{s.secret_key_env} and their permissions on bucket {s.bucket!r}"
            )
        return f"S3 endpoint {s.host} refused {op} of {self._where(key)} ({code}): {why}"

    def _make_bucket(self) -> None:
        try:
            self._client.make_bucket(self.bucket, location=self.settings.region)
            log.info("created bucket %s at %s", self.bucket, self.settings.host)
        except S3Error as exc:
            if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def _not_found(self, key: str, missing: _Missing) -> ObjectNotFound:
        if missing.bucket:
            return ObjectNotFound(f"bucket {self.bucket!r} does not exist at {self.settings.host}")
        return ObjectNotFound(f"{self.uri(key)} does not exist")

    # -- operations

    def _part_size(self, size: int) -> int:
        part = self.settings.part_size_mb * _MIB
        # S3 allows at most 10000 parts: grow the part for very large files.
        needed = -(-size // 10_000)
        if needed > part:
            part = -(-needed // _MIB) * _MIB
        return part

    def put_file(
        self, key: str, path: str | Path, *, progress: Progress | None = None
    ) -> ObjectInfo:
        name = self._name(key)
        size = os.stat(path).st_size
        part_size = self._part_size(size)

        def attempt() -> ObjectInfo:
            with open(path, "rb") as fh:
                reader = _HashingReader(fh, progress)
                self._client.put_object(
                    self.bucket,
                    name,
                    reader,  # type: ignore[arg-type]
                    size,
                    part_size=part_size,
                    num_parallel_uploads=self.settings.parallel_uploads,
                )
            return ObjectInfo(key, reader.count, reader.digest.hexdigest())

        try:
            return self._call("upload", key, attempt, write=True)
        except _Missing as missing:
            raise self._not_found(key, missing) from None

    def get_file(self, key: str, path: str | Path) -> ObjectInfo:
        name = self._name(key)
        dest = Path(path)

        def fill(dst: Any) -> tuple[int, str]:
            response = self._client.get_object(self.bucket, name)
            try:
                expected = int(response.headers.get("content-length", -1))
                digest = hashlib.sha256()
                count = 0
                for chunk in response.stream(_MIB):
                    dst.write(chunk)
                    digest.update(chunk)
                    count += len(chunk)
            finally:
                response.close()
                response.release_conn()
            if expected >= 0 and count != expected:
                raise _Retryable(f"short read: {count} of {expected} bytes")
            return count, digest.hexdigest()

        try:
            size, sha = self._call(
                "download", key, lambda: _write_atomic(dest, fill, durable=False)
            )
        except _Missing as missing:
            raise self._not_found(key, missing) from None
        return ObjectInfo(key, size, sha)

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        name = self._name(key)

        def attempt() -> None:
            self._client.put_object(self.bucket, name, io.BytesIO(data), len(data))

        try:
            self._call("upload", key, attempt, write=True)
        except _Missing as missing:
            raise self._not_found(key, missing) from None
        return ObjectInfo(key, len(data), hashlib.sha256(data).hexdigest())

    def get_bytes(self, key: str) -> bytes:
        name = self._name(key)

        def attempt() -> bytes:
            response = self._client.get_object(self.bucket, name)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        try:
            return self._call("read", key, attempt)
        except _Missing as missing:
            raise self._not_found(key, missing) from None

    def exists(self, key: str) -> bool:
        name = self._name(key)
        try:
            self._call("stat", key, lambda: self._client.stat_object(self.bucket, name))
        except _Missing:
            return False
        return True

    def list(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        _check_prefix(prefix)
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        skip = len(self.prefix) + 1 if self.prefix else 0

        def attempt() -> builtins.list[ObjectInfo]:
            found = []
            for obj in self._client.list_objects(self.bucket, prefix=full, recursive=True):
                name = obj.object_name or ""
                if obj.is_dir or name.endswith("/"):
                    continue
                modified = obj.last_modified.timestamp() if obj.last_modified else None
                found.append(ObjectInfo(name[skip:], obj.size or 0, modified=modified))
            return found

        try:
            found = self._call("list", prefix, attempt)
        except _Missing:
            return []
        return sorted(found, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        name = self._name(key)
        with contextlib.suppress(_Missing):
            self._call("delete", key, lambda: self._client.remove_object(self.bucket, name))

    def delete_prefix(self, prefix: str) -> int:
        objects = self.list(prefix)
        names = [self._name(obj.key) for obj in objects]

        def attempt() -> None:
            errors = list(
                self._client.remove_objects(self.bucket, (DeleteObject(n) for n in names))
            )
            if errors:
                raise StoreError(
                    f"S3 delete under {self._where(prefix)} failed for {len(errors)} objects, "
                    f"e.g. {errors[0].name}: {errors[0].code} {errors[0].message}"
                )

        if names:
            try:
                self._call("delete", prefix or "", attempt)
            except _Missing:
                return 0
        return len(names)

    def check(self) -> None:
        def attempt() -> bool:
            return bool(self._client.bucket_exists(self.bucket))

        if self._call("check", "", attempt):
            return
        if not self.settings.create_bucket:
            raise StoreError(f"bucket {self.bucket!r} does not exist at {self.settings.host}")
        self._call("create bucket", "", self._make_bucket)


def _brief(exc: BaseException | None) -> str:
    if exc is None:
        return "none"
    text = str(exc) or type(exc).__name__
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        text = str(exc.reason)
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= 300 else text[:297] + "..."


# ------------------------------------------------------------------------------ opening a store


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> (`bucket`, `a/b`)."""
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise StoreError(f"not an s3:// URI: {uri!r}")
    return parts.netloc, parts.path.strip("/")


def open_store(root: str | Path, s3: S3Settings | None = None) -> Store:
    """The store at `root`: a local directory (a path or `file://` URI) or `s3://bucket/prefix`.

    For an `s3://` root, `s3` supplies the connection (endpoint, TLS, credential variables,
    tuning); the bucket and prefix come from the URI. An empty root means `s3.root`.
    """
    root = str(root)
    if not root:
        if s3 is None:
            raise StoreError("no store root: give a directory, an s3:// URI or S3 settings")
        root = s3.root
    if root.startswith("s3://"):
        bucket, prefix = split_s3_uri(root)
        if s3 is None:
            raise StoreError(f"store root {root} is on S3 but no S3 settings (endpoint) were given")
        try:
            settings = s3.model_copy(update={"bucket": bucket, "prefix": prefix})
            settings = S3Settings.model_validate(settings.model_dump())
        except ValueError as exc:
            raise StoreError(f"invalid store root {root!r}: {exc}") from exc
        return S3Store(settings)
    if root.startswith("file://"):
        root = urlsplit(root).path
    elif "://" in root:
        raise StoreError(f"unsupported store root {root!r}: use a directory or s3://bucket/prefix")
    return LocalStore(root)


def _store_for(uri: str, s3: S3Settings | None) -> tuple[Store, str]:
    """A store rooted at the bucket of an `s3://` URI, and the key the URI names in it."""
    if uri.startswith("s3://"):
        bucket, key = split_s3_uri(uri)
        return open_store(f"s3://{bucket}", s3), key
    raise StoreError(f"not an s3:// URI: {uri!r}")


def fetch(uri: str | Path, dest: str | Path, s3: S3Settings | None = None) -> Path:
    """Make the file or directory at `uri` available locally and return its local path.

    A local path (or `file://` URI) is returned as it is. An `s3://` URI naming one object is
    downloaded to `dest` (into it, when `dest` is an existing directory); one naming a prefix is
    downloaded as a directory tree to `dest`.
    """
    uri = str(uri)
    if not uri.startswith("s3://"):
        return Path(urlsplit(uri).path if uri.startswith("file://") else uri)
    store, key = _store_for(uri, s3)
    dest = Path(dest)
    if key and store.exists(key):
        target = dest / key.rsplit("/", 1)[-1] if dest.is_dir() else dest
        store.get_file(key, target)
        return target
    if not key:
        raise StoreError(f"{uri} names a whole bucket; give a prefix")
    store.get_dir(key, dest)
    return dest


def publish(src: str | Path, uri: str, s3: S3Settings | None = None) -> str:
    """Upload a local file or directory to `uri` (`s3://...` or a local path); returns `uri`."""
    src = Path(src)
    if uri.startswith("s3://"):
        store, key = _store_for(uri, s3)
        if src.is_dir():
            store.put_dir(key, src)
        else:
            store.put_file(_check_key(key), src)
        return uri
    target = Path(urlsplit(uri).path if uri.startswith("file://") else uri)
    if src.is_dir():
        LocalStore(target).put_dir("", src)
    else:
        LocalStore(target.parent).put_file(target.name, src)
    return uri


# ---------------------------------------------------------------------------------- checkpoints


class CheckpointStore:
    """Checkpoints and progress of one run (`<namespace>/<job>`) in a store."""

    def __init__(self, store: Store, run: str):
        self.store = store
        self.run = _check_key(run.strip("/"), what="run")

    def __repr__(self) -> str:
        return f"CheckpointStore({self.store!r}, {self.run!r})"

    def _stage_key(self, stage: str) -> str:
        return f"{self.run}/{_check_name(stage, 'stage')}"

    def _tag_key(self, stage: str, tag: str) -> str:
        return f"{self._stage_key(stage)}/{_check_name(tag, 'tag')}"

    def artifact_key(self, *parts: str) -> str:
        """Store key of an artifact of this run, e.g. `artifact_key("model")`."""
        return _check_key(_join(self.run, *parts))

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
        files = _local_files(local_dir)
        if any(rel == META_FILE for rel, _ in files):
            raise StoreError(f"{local_dir} holds a {META_FILE}, a name the store reserves")
        base = self._tag_key(stage, tag)
        ordered = _by_size_desc(files)
        infos = _run_parallel(
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
        created = _now_iso()
        record = {
            "formatVersion": FORMAT_VERSION,
            "stage": stage,
            "tag": tag,
            "step": step,
            "phase": phase,
            "final": final,
            "createdAt": created,
            "meta": meta,
            "files": [{"path": e.path, "size": e.size, "sha256": e.sha256} for e in entries],
        }
        self.store.put_bytes(
            meta_key, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
        )

        listed = {f"{base}/{e.path}" for e in entries} | {meta_key}
        for obj in self.store.list(base + "/"):
            if obj.key not in listed:
                self.store.delete(obj.key)

        checkpoint = Checkpoint(
            stage, tag, step, phase, self.store.uri(base), meta, entries, final, created, base
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
            record = json.loads(raw)
            # Paths are checked like keys: a record can never make `load` write outside its dir.
            files = tuple(
                FileEntry(_check_key(str(f["path"]), "path"), int(f["size"]), str(f["sha256"]))
                for f in record["files"]
            )
            return Checkpoint(
                stage=stage,
                tag=tag,
                step=int(record.get("step", 0)),
                phase=record.get("phase"),
                uri=self.store.uri(base),
                meta=dict(record.get("meta") or {}),
                files=files,
                final=bool(record.get("final", False)),
                created_at=str(record.get("createdAt", "")),
                key=base,
            )
        except (ValueError, KeyError, TypeError, StoreError) as exc:
            raise CheckpointCorrupt(
                f"{self.store.uri(base)}/{META_FILE} is unreadable: {exc}"
            ) from exc

    def _tags(self, stage: str) -> tuple[set[str], dict[str, builtins.list[ObjectInfo]]]:
        """(committed tags, every tag's objects) under the stage."""
        stage_key = self._stage_key(stage)
        committed: set[str] = set()
        objects: dict[str, builtins.list[ObjectInfo]] = {}
        for obj in self.store.list(stage_key + "/"):
            rest = obj.key[len(stage_key) + 1 :]
            tag, sep, name = rest.partition("/")
            if not sep or not _NAME_RE.match(tag):
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
            _run_parallel(
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

    def write_progress(self, stage: str, progress: Mapping[str, Any]) -> dict[str, Any]:
        """Write `<run>/<stage>/progress.json` (camelCase keys: phase, step, totalSteps, loss,
        tokensPerSecond, ...); `stage` and `updatedAt` are filled in. Returns what was written."""
        record = {"stage": stage, **progress}
        record.setdefault("updatedAt", _now_iso())
        key = f"{self._stage_key(stage)}/{PROGRESS_FILE}"
        self.store.put_bytes(key, (json.dumps(record, sort_keys=True) + "\n").encode())
        return record

    def read_progress(self, stage: str) -> dict[str, Any] | None:
        key = f"{self._stage_key(stage)}/{PROGRESS_FILE}"
        try:
            raw = self.store.get_bytes(key)
        except ObjectNotFound:
            return None
        try:
            record = json.loads(raw)
        except ValueError as exc:
            log.warning("ignoring unreadable %s: %s", self.store.uri(key), exc)
            return None
        return record if isinstance(record, dict) else None


__all__ = [
    "Checkpoint",
    "CheckpointCorrupt",
    "CheckpointStore",
    "FileEntry",
    "LocalStore",
    "NoCheckpoint",
    "ObjectInfo",
    "ObjectNotFound",
    "S3Settings",
    "S3Store",
    "Store",
    "StoreAuthError",
    "StoreError",
    "StoreUnavailable",
    "backoff_delay",
    "fetch",
    "open_store",
    "publish",
    "split_s3_uri",
]
