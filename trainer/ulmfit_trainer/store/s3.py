"""`S3Store`: the store layout in an S3 bucket under a key prefix, through the minio client,
with the one retry policy (`backoff_delay`) every S3 operation goes through."""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import http.client
import io
import logging
import os
import queue
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import certifi
import urllib3
from minio import Minio
from minio.datatypes import Part
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, S3Error, ServerError

from ulmfit_trainer.config import S3Settings
from ulmfit_trainer.store.base import ObjectInfo, Store, check_key, check_prefix, join_key
from ulmfit_trainer.store.errors import (
    ObjectNotFound,
    StoreAuthError,
    StoreError,
    StoreUnavailable,
)
from ulmfit_trainer.store.files import MIB, Progress, T, read_exactly, write_atomic

log = logging.getLogger(__name__)


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number `attempt` (1-based): `base * 2**(attempt-1)` capped at
    `cap`, with equal jitter (half fixed, half random) so many clients do not retry in step."""
    delay = min(cap, base * 2 ** (attempt - 1))
    return delay / 2 + (rng or random).uniform(0, delay / 2)


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

    Files go up as multipart uploads (`partSizeMb` parts, `parallelUploads` at a time) in one
    pass over the file, hashed on the way, through reused part buffers; downloads stream to disk
    in chunks and are hashed as they arrive (a load is one pass too), so memory stays bounded
    whatever the file size. Connection errors and 5xx answers are retried with exponential
    backoff and jitter; rejected credentials are not.
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
        return join_key(self.prefix, check_key(key))

    def uri(self, key: str = "") -> str:
        path = join_key(self.prefix, check_key(key)) if key else self.prefix
        return f"s3://{self.bucket}/{path}" if path else f"s3://{self.bucket}"

    def _where(self, key: str) -> str:
        """`uri` for messages: takes prefixes too and never raises."""
        return f"s3://{self.bucket}/{join_key(self.prefix, key)}".rstrip("/")

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
        part = self.settings.part_size_mb * MIB
        # S3 allows at most 10000 parts: grow the part for very large files.
        needed = -(-size // 10_000)
        if needed > part:
            part = -(-needed // MIB) * MIB
        return part

    def put_file(
        self, key: str, path: str | Path, *, progress: Progress | None = None
    ) -> ObjectInfo:
        name = self._name(key)
        size = os.stat(path).st_size
        part_size = self._part_size(size)

        def attempt() -> ObjectInfo:
            # Unbuffered: every read goes straight into the part buffer, no second copy.
            with open(path, "rb", buffering=0) as fh:
                if size <= part_size:
                    count, sha = self._put_whole(name, fh, size, part_size, progress)
                else:
                    count, sha = self._put_parts(name, fh, size, part_size, progress)
            return ObjectInfo(key, count, sha)

        try:
            return self._call("upload", key, attempt, write=True)
        except _Missing as missing:
            raise self._not_found(key, missing) from None

    def _put_whole(
        self, name: str, fh: Any, size: int, part_size: int, progress: Progress | None
    ) -> tuple[int, str]:
        """A file of at most one part: one read, one hash, one PUT."""
        chunks = []
        left = size
        while left:
            chunk = fh.read(left)
            if not chunk:
                raise OSError(f"{fh.name} shrank while it was uploaded: {size - left} of {size}")
            chunks.append(chunk)
            left -= len(chunk)
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if progress is not None and size:
            progress(size)
        # `part_size` of at least the size: one PUT, no multipart upload.
        self._client.put_object(self.bucket, name, io.BytesIO(data), size, part_size=part_size)
        return size, hashlib.sha256(data).hexdigest()

    def _put_parts(
        self, name: str, fh: Any, size: int, part_size: int, progress: Progress | None
    ) -> tuple[int, str]:
        """A multipart upload in one pass over the file, `parallelUploads` parts at a time.

        This thread reads each part into a buffer and feeds the whole-file sha256 (in file
        order); a pool sends the parts. The buffers are reused (at most one per upload thread),
        so a file of any size costs `parallelUploads * partSizeMb` of memory and no fresh
        allocation per part. Any failure aborts the upload, so no part outlives a failed try.
        """
        client = self._client
        count = -(-size // part_size)
        workers = min(self.settings.parallel_uploads, count)
        upload_id = client._create_multipart_upload(
            self.bucket, name, {"Content-Type": "application/octet-stream"}
        )
        digest = hashlib.sha256()
        etags = [""] * count
        errors: list[BaseException] = []
        free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        buffers = 0

        def send(number: int, buffer: bytearray, length: int) -> None:
            try:
                # minio hashes (for the signature), measures and sends the body, nothing else:
                # a view of the buffer does instead of a copy.
                view = cast(bytes, memoryview(buffer)[:length])
                etags[number - 1] = client._upload_part(
                    self.bucket, name, view, None, upload_id, number
                )
            except BaseException as exc:
                errors.append(exc)
                raise
            finally:
                free.put(buffer)  # only now: the buffer is not reused while it is being sent

        pool = ThreadPoolExecutor(workers, thread_name_prefix="s3-part")
        try:
            try:
                sent = []
                for number in range(1, count + 1):
                    if buffers < workers:
                        buffer, buffers = bytearray(part_size), buffers + 1
                    else:
                        buffer = free.get()  # a part went out (or failed): reuse its buffer
                    if errors:
                        raise errors[0]  # stop reading at the first failed part
                    length = min(part_size, size - (number - 1) * part_size)
                    view = memoryview(buffer)[:length]
                    read_exactly(fh, view)
                    digest.update(view)
                    if progress is not None:
                        progress(length)
                    sent.append(pool.submit(send, number, buffer, length))
                for future in sent:
                    future.result()
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
            client._complete_multipart_upload(
                self.bucket, name, upload_id, [Part(n + 1, etag) for n, etag in enumerate(etags)]
            )
        except BaseException:
            try:
                client._abort_multipart_upload(self.bucket, name, upload_id)
            except Exception as exc:  # the server may be gone: the original error matters
                log.debug("abort of the multipart upload of %s failed: %s", name, _brief(exc))
            raise
        return size, digest.hexdigest()

    def get_file(self, key: str, path: str | Path) -> ObjectInfo:
        name = self._name(key)
        dest = Path(path)

        def fill(dst: Any) -> tuple[int, str]:
            response = self._client.get_object(self.bucket, name)
            try:
                expected = int(response.headers.get("content-length", -1))
                digest = hashlib.sha256()
                count = 0
                for chunk in response.stream(MIB):
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
            size, sha = self._call("download", key, lambda: write_atomic(dest, fill, durable=False))
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
        check_prefix(prefix)
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
