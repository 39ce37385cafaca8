"""The store against a real S3 server (SeaweedFS on loopback): the same contract as the local
backend, plus what only a network store can do wrong — multipart, credentials, outages."""

from __future__ import annotations

import hashlib
import logging
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ulmfit_trainer.config import S3Settings
from ulmfit_trainer.store import (
    CheckpointStore,
    S3Store,
    Store,
    StoreAuthError,
    StoreError,
    StoreUnavailable,
    fetch,
    open_store,
    publish,
)

from tests.harness.ports import free_port
from tests.harness.s3 import SeaweedS3
from tests.unit import test_store_local as contract
from tests.unit.test_store_local import RUN, make_checkpoint_dir, tree

MIB = 1024 * 1024


@pytest.fixture
def s3_env(s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)


@pytest.fixture
def settings(s3_server: SeaweedS3, s3_bucket: str, s3_env: None) -> S3Settings:
    return S3Settings(
        endpoint=s3_server.url,
        bucket=s3_bucket,
        prefix="ulmfit",
        part_size_mb=5,
        parallel_uploads=2,
        timeout_seconds=15,
        # Short waits so that outage tests finish quickly.
        max_attempts=8,
        retry_base_delay=0.25,
        retry_max_delay=2.0,
    )


def s3_store(settings: S3Settings, **changes: object) -> S3Store:
    return S3Store(settings.model_copy(update=changes))


class TestS3StoreContract(contract.TestStoreContract):
    """Every contract test of the local backend, on S3."""

    @pytest.fixture
    def store(self, settings: S3Settings) -> Store:
        return S3Store(settings)

    def test_uri_is_an_s3_uri(self, store: Store, settings: S3Settings) -> None:
        assert store.uri("a/b") == f"s3://{settings.bucket}/ulmfit/a/b"
        assert store.uri() == f"s3://{settings.bucket}/ulmfit"


def random_file(path: Path, size: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "wb") as fh:
        left = size
        while left:
            n = min(left, MIB)
            fh.write(rng.randbytes(n))
            left -= n
    return path


def test_minio_client_put_get_list_and_multipart(
    s3_server: SeaweedS3, s3_bucket: str, tmp_path: Path
) -> None:
    """The server speaks enough S3 for the store: plain and multipart puts, ranged gets, lists."""
    client = s3_server.minio()
    big = random_file(tmp_path / "big.bin", 12 * MIB + 17, seed=1)
    result = client.fput_object(s3_bucket, "raw/big.bin", str(big), part_size=5 * MIB)
    assert result.etag.endswith("-3")  # three parts: 5 + 5 + 2 MiB
    client.fget_object(s3_bucket, "raw/big.bin", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()
    response = client.get_object(s3_bucket, "raw/big.bin", offset=5 * MIB, length=10)
    try:
        assert response.read() == big.read_bytes()[5 * MIB : 5 * MIB + 10]
    finally:
        response.close()
        response.release_conn()
    listed = {o.object_name: o.size for o in client.list_objects(s3_bucket, recursive=True)}
    assert listed == {"raw/big.bin": 12 * MIB + 17}


def test_store_uploads_large_files_in_parallel_parts(
    settings: S3Settings, s3_server: SeaweedS3, tmp_path: Path
) -> None:
    store = S3Store(settings)
    big = random_file(tmp_path / "big.bin", 16 * MIB + 1, seed=2)
    info = store.put_file("ckpt/big.bin", big)
    assert info.sha256 == hashlib.sha256(big.read_bytes()).hexdigest()
    stat = s3_server.minio().stat_object(settings.bucket, "ulmfit/ckpt/big.bin")
    assert stat.size == big.stat().st_size and stat.etag.endswith("-4")
    back = store.get_file("ckpt/big.bin", tmp_path / "back.bin")
    assert back.sha256 == info.sha256


def test_wrong_credentials_are_rejected_clearly_without_retries(
    settings: S3Settings,
    s3_server: SeaweedS3,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    store = S3Store(settings)
    operations: list[Callable[[], object]] = [
        lambda: store.put_bytes("x", b"1"),
        lambda: store.get_bytes("x"),
        lambda: store.exists("x"),
        lambda: store.list(""),
        store.check,
    ]
    with caplog.at_level(logging.WARNING, logger="ulmfit_trainer.store"):
        for operation in operations:
            with pytest.raises(StoreAuthError) as raised:
                operation()
            message = str(raised.value)
            assert s3_server.endpoint in message
            assert "AWS_ACCESS_KEY_ID" in message and "AWS_SECRET_ACCESS_KEY" in message
            assert "SignatureDoesNotMatch" in message
    assert not [r for r in caplog.records if "retry" in r.getMessage()]

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKNOBODY")
    with pytest.raises(StoreAuthError, match="InvalidAccessKeyId"):
        S3Store(settings).put_bytes("x", b"1")


def test_missing_credentials_name_the_variables(
    settings: S3Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CKPT_KEY", raising=False)
    monkeypatch.delenv("CKPT_SECRET", raising=False)
    store = s3_store(settings, access_key_env="CKPT_KEY", secret_key_env="CKPT_SECRET")
    with pytest.raises(StoreAuthError, match=r"no credentials.*CKPT_KEY and CKPT_SECRET"):
        store.put_bytes("x", b"1")


def test_credentials_come_from_the_named_variables(
    settings: S3Settings, s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    monkeypatch.setenv("CKPT_KEY", s3_server.access_key)
    monkeypatch.setenv("CKPT_SECRET", s3_server.secret_key)
    store = s3_store(settings, access_key_env="CKPT_KEY", secret_key_env="CKPT_SECRET")
    store.put_bytes("x", b"1")
    assert store.get_bytes("x") == b"1"


def test_unreachable_endpoint_is_store_unavailable_after_retries(
    settings: S3Settings, caplog: pytest.LogCaptureFixture
) -> None:
    endpoint = f"127.0.0.1:{free_port()}"  # nothing listens here
    store = s3_store(
        settings, endpoint=endpoint, max_attempts=3, retry_base_delay=0.01, retry_max_delay=0.02
    )
    with (
        caplog.at_level(logging.WARNING, logger="ulmfit_trainer.store"),
        pytest.raises(StoreUnavailable) as raised,
    ):
        store.put_bytes("x", b"1")
    message = str(raised.value)
    assert endpoint in message and "3 times" in message
    assert len([r for r in caplog.records if "retry" in r.getMessage()]) == 2


def test_bucket_is_created_on_first_write_or_reported(
    settings: S3Settings, s3_server: SeaweedS3
) -> None:
    bucket = f"auto-{random.Random().getrandbits(48):012x}"
    try:
        S3Store(settings.model_copy(update={"bucket": bucket})).put_bytes("a/b", b"1")
        assert s3_server.minio().bucket_exists(bucket)
        strict = s3_store(settings, bucket=f"{bucket}-2", create_bucket=False)
        with pytest.raises(StoreError, match="does not exist"):
            strict.check()
        assert strict.list("") == [] and not strict.exists("a")
    finally:
        s3_server.remove_bucket(bucket)


def test_fetch_and_publish_s3_uris(settings: S3Settings, tmp_path: Path) -> None:
    src = make_checkpoint_dir(tmp_path / "dataset", seed=12)
    uri = f"s3://{settings.bucket}/datasets/demo"
    assert publish(src, uri, settings) == uri
    assert tree(fetch(uri, tmp_path / "copy", settings)) == tree(src)
    one = fetch(f"{uri}/model.bin", tmp_path, settings)
    assert one == tmp_path / "model.bin"
    assert one.read_bytes() == (src / "model.bin").read_bytes()
    store = open_store(f"s3://{settings.bucket}/datasets", settings)
    assert {o.key for o in store.list("demo/")} == {f"demo/{rel}" for rel in tree(src)}


# ----------------------------------------------------------------------------------- outages


class StopOnce:
    """An upload progress callback that stops the server once `after` bytes were read (with
    `crash`, by SIGKILL); with `restart_after`, a thread starts it again that many seconds later."""

    def __init__(
        self,
        server: SeaweedS3,
        after: int,
        restart_after: float | None,
        crash: bool = False,
    ):
        self.server = server
        self.after = after
        self.restart_after = restart_after
        self.crash = crash
        self.read = 0
        self.fired = threading.Event()
        self.restarted = threading.Event()
        self._lock = threading.Lock()
        self.restarter: threading.Thread | None = None

    def __call__(self, n: int) -> None:
        with self._lock:
            self.read += n
            if self.fired.is_set() or self.read < self.after:
                return
            self.fired.set()
            if self.crash:
                self.server.kill()
            else:
                self.server.stop()
            if self.restart_after is not None:
                self.restarter = threading.Thread(target=self._restart, daemon=True)
                self.restarter.start()

    def _restart(self) -> None:
        assert self.restart_after is not None
        threading.Event().wait(self.restart_after)
        self.server.start()
        self.restarted.set()


@pytest.fixture
def outage_dirs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    old = make_checkpoint_dir(tmp_path / "old", seed=20, sizes={"model.bin": 64_000})
    new = make_checkpoint_dir(
        tmp_path / "new", seed=21, sizes={"model.bin": 14 * MIB, "optim.bin": 11 * MIB}
    )
    yield old, new


def test_upload_survives_a_server_restart(
    settings: S3Settings,
    s3_server: SeaweedS3,
    outage_dirs: tuple[Path, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    old, new = outage_dirs
    # Enough tries to outlast a restart on a busy machine (at least ~13 s of backoff).
    checkpoints = CheckpointStore(s3_store(settings, max_attempts=15), RUN)
    checkpoints.save("finetune", "step-1", old, {}, step=1)
    outage = StopOnce(s3_server, after=7 * MIB, restart_after=0.5)
    with caplog.at_level(logging.WARNING, logger="ulmfit_trainer.store"):
        saved = checkpoints.save("finetune", "step-2", new, {}, step=2, progress=outage)
    assert outage.fired.is_set() and outage.restarter is not None
    outage.restarter.join(60)  # the save can finish before the harness sees the server ready
    assert outage.restarted.is_set()
    assert [r for r in caplog.records if "retry" in r.getMessage()]  # it did go through retries
    latest = checkpoints.latest("finetune")
    assert latest is not None and latest.tag == "step-2" and latest.files == saved.files
    checkpoints.load("finetune", tmp_path / "restore")
    assert tree(tmp_path / "restore") == tree(new)


def test_upload_fails_clearly_when_the_server_crashes_and_stays_down(
    settings: S3Settings, s3_server: SeaweedS3, outage_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    old, new = outage_dirs
    store = s3_store(settings, max_attempts=3, retry_base_delay=0.05, retry_max_delay=0.1)
    checkpoints = CheckpointStore(store, RUN)
    checkpoints.save("finetune", "step-1", old, {}, step=1)
    outage = StopOnce(s3_server, after=7 * MIB, restart_after=None, crash=True)
    with pytest.raises(StoreUnavailable) as raised:
        checkpoints.save("finetune", "step-2", new, {}, step=2, progress=outage)
    assert s3_server.endpoint in str(raised.value) and "3 times" in str(raised.value)

    s3_server.start()
    # Whatever of step-2 reached the server, it was never committed.
    assert [c.tag for c in checkpoints.committed("finetune")] == ["step-1"]
    assert checkpoints.load("finetune", tmp_path / "restore").tag == "step-1"
    assert tree(tmp_path / "restore") == tree(old)


# ------------------------------------------------------------------- one pass each way, bounded


def test_save_reads_each_file_once_in_bounded_memory(
    settings: S3Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save reads each file once (hashing and uploading the same bytes) through at most
    `parallelUploads` reused part buffers: no separate hashing pass, no buffer per part."""
    import tracemalloc

    from ulmfit_trainer.store import s3 as s3_module

    from tests.unit.test_store_s3_upload import CountingOpen

    src = tmp_path / "ckpt"
    src.mkdir()
    big = random_file(src / "model.bin", 6 * 5 * MIB + 123, seed=30)  # 7 parts of 5 MiB
    small = random_file(src / "latest", 1000, seed=31)
    opener = CountingOpen()
    monkeypatch.setattr(s3_module, "open", opener, raising=False)
    store = s3_store(settings, parallel_uploads=2, parallel_files=1)
    tracemalloc.start()
    try:
        saved = CheckpointStore(store, RUN).save("finetune", "step-1", src, {}, step=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert opener.opened == 2 and opener.read == big.stat().st_size + small.stat().st_size
    # Two 5 MiB part buffers and change; one buffer per part in flight plus the one being read
    # (what minio's own `put_object` holds) would be three.
    assert peak < 2.5 * 5 * MIB, f"peak traced memory {peak / MIB:.1f} MiB"
    assert {f.path: f.sha256 for f in saved.files} == tree(src)


def test_load_verifies_while_downloading_and_refuses_a_corrupt_object(
    settings: S3Settings, s3_server: SeaweedS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load hashes the bytes as they arrive (each file is written once and never read back),
    and a multipart object changed on the server after the save is refused, with nothing of
    it left in the destination."""
    import builtins
    import io

    from ulmfit_trainer.store import CheckpointCorrupt
    from ulmfit_trainer.store import s3 as s3_module

    src = tmp_path / "ckpt"
    src.mkdir()
    random_file(src / "model.bin", 3 * 5 * MIB + 9, seed=40)
    random_file(src / "optim.bin", 2 * MIB, seed=41)
    checkpoints = CheckpointStore(S3Store(settings), RUN)
    saved = checkpoints.save("finetune", "step-1", src, {}, step=1)

    hashed = 0

    class CountingSha256:
        def __init__(self) -> None:
            self._digest = hashlib.sha256()

        def update(self, data: bytes) -> None:
            nonlocal hashed
            hashed += len(data)
            self._digest.update(data)

        def hexdigest(self) -> str:
            return self._digest.hexdigest()

    class Hashlib:
        sha256 = CountingSha256

    reads: list[str] = []
    real_open = builtins.open

    def watching_open(file: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        if "r" in mode and str(tmp_path / "restore") in str(file):
            reads.append(str(file))
        return real_open(file, mode, *args, **kwargs)  # type: ignore[call-overload]

    restore = tmp_path / "restore"
    with monkeypatch.context() as patch:
        patch.setattr(s3_module, "hashlib", Hashlib)
        patch.setattr(builtins, "open", watching_open)
        patch.setattr(io, "open", watching_open)
        checkpoints.load("finetune", restore)
    assert reads == [] and hashed == saved.size
    assert tree(restore) == tree(src)

    # Flip one byte of the multipart object on the server, keeping its size.
    client = s3_server.minio()
    name = f"ulmfit/{saved.key}/model.bin"
    data = bytearray((src / "model.bin").read_bytes())
    data[len(data) // 3] ^= 0x01
    client.put_object(settings.bucket, name, io.BytesIO(bytes(data)), len(data), part_size=5 * MIB)
    with pytest.raises(CheckpointCorrupt, match=r"model\.bin has sha256 .* meta\.json says"):
        checkpoints.load("finetune", tmp_path / "again", tag="step-1")
    assert not list((tmp_path / "again").iterdir())  # no partial file, no staging directory
