"""`S3Store.put_file`'s upload pipeline against a stand-in minio client: one pass over the file,
parts in order, a bounded set of reused part buffers, and a failed part aborts the upload.

The real client and server are in tests/integration/test_store_s3.py; this file pins what the
pipeline does with the client, without a server.
"""

from __future__ import annotations

import hashlib
import io
import random
import threading
from pathlib import Path
from typing import Any

import pytest
from ulmfit_trainer.config import S3Settings
from ulmfit_trainer.store import S3Store, StoreUnavailable
from ulmfit_trainer.store import s3 as s3_module
from ulmfit_trainer.store.files import read_exactly

MIB = 1024 * 1024


class FakeMinio:
    """The calls `S3Store.put_file` makes, recording what each part carried."""

    def __init__(self, fail_part: int | None = None, fail_times: int = 1_000):
        self.lock = threading.Lock()
        self.parts: dict[int, bytes] = {}
        self.buffers: set[int] = set()  # identities of the buffers the parts came in
        self.in_flight = 0
        self.max_in_flight = 0
        self.completed: list[tuple[str, list[int]]] = []
        self.aborted: list[str] = []
        self.puts: dict[str, bytes] = {}
        self.fail_part = fail_part
        self.fail_times = fail_times
        self.uploads = 0

    def put_object(self, bucket: str, name: str, data: Any, length: int, **_: Any) -> None:
        body = data.read(length)
        assert len(body) == length
        self.puts[name] = body

    def _create_multipart_upload(self, bucket: str, name: str, headers: dict) -> str:
        self.uploads += 1
        self.parts = {}
        return f"upload-{self.uploads}"

    def _upload_part(
        self, bucket: str, name: str, data: Any, headers: Any, upload_id: str, number: int
    ) -> str:
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.buffers.add(id(data.obj))  # a view of the reusable part buffer
        try:
            if number == self.fail_part and self.fail_times > 0:
                self.fail_times -= 1
                raise ConnectionError(f"part {number} lost")
            threading.Event().wait(0.002)  # a part takes a moment, so several are in flight
            with self.lock:
                self.parts[number] = bytes(data)
            return f"etag-{number}"
        finally:
            with self.lock:
                self.in_flight -= 1

    def _complete_multipart_upload(
        self, bucket: str, name: str, upload_id: str, parts: list[Any]
    ) -> None:
        assert [p.etag for p in parts] == [f"etag-{p.part_number}" for p in parts]
        self.completed.append((name, [p.part_number for p in parts]))

    def _abort_multipart_upload(self, bucket: str, name: str, upload_id: str) -> None:
        self.aborted.append(upload_id)

    def body(self) -> bytes:
        return b"".join(self.parts[n] for n in sorted(self.parts))


def make_store(client: FakeMinio, **changes: Any) -> S3Store:
    settings = S3Settings(
        endpoint="127.0.0.1:1",
        bucket="bench",
        prefix="",
        part_size_mb=5,
        parallel_uploads=3,
        max_attempts=2,
        retry_base_delay=0.01,
        retry_max_delay=0.01,
    ).model_copy(update=changes)
    return S3Store(settings, client=client)  # type: ignore[arg-type]


def random_file(path: Path, size: int, seed: int = 0) -> Path:
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


class CountingOpen:
    """Stands in for `open` in the s3 module: counts opens and the bytes read through them."""

    def __init__(self) -> None:
        self.opened = 0
        self.read = 0

    def __call__(self, path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        self.opened += 1
        raw = open(path, mode, *args, **kwargs)  # noqa: SIM115 - the caller closes it
        counter = self

        class Counted(io.RawIOBase):
            name = raw.name

            def readinto(self, buffer: Any) -> int:
                n: int = raw.readinto(buffer)
                counter.read += n
                return n

            def read(self, size: int = -1) -> bytes:
                data: bytes = raw.read(size)
                counter.read += len(data)
                return data

            def close(self) -> None:
                raw.close()
                super().close()

        return Counted()


@pytest.mark.parametrize("size", [0, 1, 5 * MIB, 5 * MIB + 1, 23 * MIB + 7])
def test_upload_reads_the_file_once_and_hashes_what_it_sends(
    size: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = FakeMinio()
    store = make_store(client)
    path = random_file(tmp_path / "f.bin", size, seed=size)
    opener = CountingOpen()
    monkeypatch.setattr(s3_module, "open", opener, raising=False)
    reported: list[int] = []

    info = store.put_file("ck/f.bin", path, progress=reported.append)

    data = path.read_bytes()
    assert info.size == size and info.sha256 == hashlib.sha256(data).hexdigest()
    assert opener.opened == 1 and opener.read == size  # one pass over the file
    assert sum(reported) == size
    if size <= 5 * MIB:  # one PUT
        assert client.puts == {"ck/f.bin": data} and not client.completed
    else:
        count = -(-size // (5 * MIB))
        assert client.completed == [("ck/f.bin", list(range(1, count + 1)))]
        assert client.body() == data


def test_part_buffers_are_bounded_and_reused(tmp_path: Path) -> None:
    client = FakeMinio()
    store = make_store(client, parallel_uploads=3)
    path = random_file(tmp_path / "f.bin", 12 * 5 * MIB + 3, seed=1)
    store.put_file("f", path)
    assert client.body() == path.read_bytes()
    # 13 parts went through at most 3 buffers, at most 3 at a time.
    assert len(client.buffers) <= 3 and client.max_in_flight <= 3


def test_a_failed_part_aborts_the_upload_and_the_retry_starts_over(tmp_path: Path) -> None:
    client = FakeMinio(fail_part=2, fail_times=1)
    store = make_store(client)
    path = random_file(tmp_path / "f.bin", 6 * 5 * MIB, seed=2)
    info = store.put_file("f", path)
    assert client.aborted == ["upload-1"]  # the failed try left no upload behind
    assert client.uploads == 2 and client.completed == [("f", [1, 2, 3, 4, 5, 6])]
    assert client.body() == path.read_bytes()
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_part_that_keeps_failing_stops_the_reading_and_gives_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = FakeMinio(fail_part=1)
    store = make_store(client, parallel_uploads=2)
    size = 40 * 5 * MIB
    path = random_file(tmp_path / "f.bin", size, seed=3)
    opener = CountingOpen()
    monkeypatch.setattr(s3_module, "open", opener, raising=False)
    with pytest.raises(StoreUnavailable, match="part 1 lost"):
        store.put_file("f", path)
    assert client.aborted == ["upload-1", "upload-2"] and not client.completed
    # Each try stopped soon after its first part failed instead of reading the whole file.
    assert opener.opened == 2 and opener.read < size


def test_a_file_that_shrinks_while_it_is_read_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    buffer = bytearray(5)
    with open(path, "rb", buffering=0) as fh, pytest.raises(OSError, match="3 of 5"):
        read_exactly(fh, memoryview(buffer))
