"""The store contract on a local directory, plus what is local-only (settings, atomic writes).

`TestStoreContract` is the contract every backend keeps; `tests/integration/test_store_s3.py`
runs the same class against a real S3 server by overriding the `store` fixture.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from pathlib import Path

import pytest
from pydantic import ValidationError
from ulmfit_trainer.config import S3Settings
from ulmfit_trainer.records import StageProgress
from ulmfit_trainer.store import (
    Checkpoint,
    CheckpointCorrupt,
    CheckpointStore,
    LocalStore,
    NoCheckpoint,
    ObjectNotFound,
    S3Store,
    Store,
    StoreError,
    backoff_delay,
    fetch,
    open_store,
    publish,
    split_s3_uri,
)

RUN = "team-a/sentiment"


def make_checkpoint_dir(path: Path, seed: int, sizes: dict[str, int] | None = None) -> Path:
    """A checkpoint-like directory with a nested layout and random bytes."""
    rng = random.Random(seed)
    sizes = sizes or {"model.bin": 300_000, "optim/rank0.pt": 120_000, "latest": 9}
    for rel, size in sizes.items():
        target = path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(rng.randbytes(size))
    return path


def tree(path: Path) -> dict[str, str]:
    return {
        p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def corrupt(store: Store, checkpoint: Checkpoint, path: str) -> None:
    """Flip one byte of a stored checkpoint file, keeping its size."""
    key = f"{checkpoint.key}/{path}"
    data = bytearray(store.get_bytes(key))
    data[len(data) // 2] ^= 0xFF
    store.put_bytes(key, bytes(data))


class TestStoreContract:
    """What every `Store` backend and the `CheckpointStore` on top of it guarantee."""

    @pytest.fixture
    def store(self, tmp_path: Path) -> Store:
        return LocalStore(tmp_path / "store")

    @pytest.fixture
    def checkpoints(self, store: Store) -> CheckpointStore:
        return CheckpointStore(store, RUN)

    # -- objects

    def test_bytes_round_trip_exists_and_missing(self, store: Store) -> None:
        info = store.put_bytes("a/b/c.json", b'{"x": 1}')
        assert info.size == 8 and info.sha256 == hashlib.sha256(b'{"x": 1}').hexdigest()
        assert store.get_bytes("a/b/c.json") == b'{"x": 1}'
        assert store.exists("a/b/c.json")
        assert not store.exists("a/b/nope")
        with pytest.raises(ObjectNotFound, match="nope"):
            store.get_bytes("a/b/nope")
        store.put_bytes("a/b/c.json", b"replaced")
        assert store.get_bytes("a/b/c.json") == b"replaced"

    def test_files_round_trip_with_checksums(self, store: Store, tmp_path: Path) -> None:
        src = tmp_path / "src.bin"
        payload = random.Random(1).randbytes(2_000_003)
        src.write_bytes(payload)
        seen: list[int] = []
        up = store.put_file("files/src.bin", src, progress=seen.append)
        assert up.size == len(payload)
        assert up.sha256 == hashlib.sha256(payload).hexdigest()
        assert sum(seen) == len(payload)
        down = store.get_file("files/src.bin", tmp_path / "out" / "copy.bin")
        assert (tmp_path / "out" / "copy.bin").read_bytes() == payload
        assert down.sha256 == up.sha256 and down.size == up.size
        assert not [p for p in (tmp_path / "out").iterdir() if p.name != "copy.bin"]
        with pytest.raises(ObjectNotFound):
            store.get_file("files/missing.bin", tmp_path / "out" / "missing.bin")
        assert not (tmp_path / "out" / "missing.bin").exists()

    def test_empty_file(self, store: Store, tmp_path: Path) -> None:
        (tmp_path / "empty").write_bytes(b"")
        assert store.put_file("e/empty", tmp_path / "empty").size == 0
        assert store.get_file("e/empty", tmp_path / "back").size == 0
        assert (tmp_path / "back").read_bytes() == b""

    def test_list_is_a_string_prefix_and_sorted(self, store: Store) -> None:
        for key in ("r/x/2", "r/x/1", "r/xy/1", "r/y/1", "other/1"):
            store.put_bytes(key, key.encode())
        assert [o.key for o in store.list("r/x/")] == ["r/x/1", "r/x/2"]
        assert [o.key for o in store.list("r/x")] == ["r/x/1", "r/x/2", "r/xy/1"]
        assert [o.key for o in store.list("")] == [
            "other/1", "r/x/1", "r/x/2", "r/xy/1", "r/y/1",
        ]  # fmt: skip
        assert store.list("nothing/") == []
        assert {o.key: o.size for o in store.list("r/y")} == {"r/y/1": 5}

    def test_delete_and_delete_prefix(self, store: Store) -> None:
        for key in ("d/1", "d/2/3", "d2/1", "keep"):
            store.put_bytes(key, b"x")
        store.delete("keep")
        store.delete("keep")  # a missing key is fine
        assert not store.exists("keep")
        assert store.delete_prefix("d/") == 2
        assert [o.key for o in store.list("")] == ["d2/1"]
        assert store.delete_prefix("nothing/") == 0

    def test_keys_are_validated(self, store: Store) -> None:
        for bad in ("", "/abs", "a//b", "a/../b", "a/./b", "back\\slash"):
            with pytest.raises(StoreError, match="invalid store key"):
                store.put_bytes(bad, b"x")

    def test_uri_names_the_location(self, store: Store) -> None:
        uri = store.uri("ns/job/x")
        assert uri.endswith("/ns/job/x")
        assert store.uri("") == store.uri().rstrip("/")

    def test_put_dir_and_get_dir(self, store: Store, tmp_path: Path) -> None:
        src = make_checkpoint_dir(tmp_path / "export", seed=3)
        infos = store.put_dir("exports/model", src)
        assert {i.key for i in infos} == {f"exports/model/{rel}" for rel in tree(src)}
        store.get_dir("exports/model", tmp_path / "back")
        assert tree(tmp_path / "back") == tree(src)
        with pytest.raises(ObjectNotFound):
            store.get_dir("exports/none", tmp_path / "none")

    def test_check_passes_on_a_usable_store(self, store: Store) -> None:
        store.check()

    # -- checkpoints

    def test_save_latest_load_round_trip(
        self, checkpoints: CheckpointStore, store: Store, tmp_path: Path
    ) -> None:
        src = make_checkpoint_dir(tmp_path / "ckpt", seed=7)
        meta = {"config": {"lr": 0.01}, "tokenizerHash": "abc123", "codeVersion": "0.1.0"}
        saved = checkpoints.save("classifier", "phase-1", src, meta, step=120, phase="head")
        assert saved.step == 120 and saved.phase == "head" and not saved.final
        assert saved.uri == store.uri(f"{RUN}/classifier/phase-1")
        assert {f.path for f in saved.files} == set(tree(src))
        assert {f.path: f.sha256 for f in saved.files} == tree(src)

        record = json.loads(store.get_bytes(f"{RUN}/classifier/phase-1/meta.json"))
        assert record["stage"] == "classifier" and record["tag"] == "phase-1"
        assert record["step"] == 120 and record["phase"] == "head" and record["final"] is False
        assert record["meta"] == meta
        assert {f["path"]: f["sha256"] for f in record["files"]} == tree(src)
        assert {f["path"]: f["size"] for f in record["files"]} == {
            rel: (src / rel).stat().st_size for rel in tree(src)
        }

        latest = checkpoints.latest("classifier")
        assert latest is not None and latest.tag == "phase-1" and latest.meta == meta
        loaded = checkpoints.load("classifier", tmp_path / "restore")
        assert loaded.tag == "phase-1"
        assert tree(tmp_path / "restore") == tree(src)

    def test_step_and_phase_come_from_meta_by_default(
        self, checkpoints: CheckpointStore, tmp_path: Path
    ) -> None:
        src = make_checkpoint_dir(tmp_path / "c", seed=1, sizes={"w": 10})
        saved = checkpoints.save("finetune", "s5", src, {"step": 5, "phase": 2})
        assert (saved.step, saved.phase) == (5, 2)

    def test_committed_is_ordered_by_step_then_tag(
        self, checkpoints: CheckpointStore, tmp_path: Path
    ) -> None:
        src = make_checkpoint_dir(tmp_path / "c", seed=1, sizes={"w": 10})
        for tag, step in (("b", 20), ("z", 3), ("a", 20), ("m", 100)):
            checkpoints.save("finetune", tag, src, {}, step=step)
        assert [c.tag for c in checkpoints.committed("finetune")] == ["z", "a", "b", "m"]
        assert checkpoints.committed("pretrain") == []
        assert checkpoints.latest("pretrain") is None

    def test_an_uncommitted_checkpoint_is_never_latest(
        self, checkpoints: CheckpointStore, store: Store, tmp_path: Path
    ) -> None:
        src = make_checkpoint_dir(tmp_path / "c", seed=2)
        checkpoints.save("finetune", "step-10", src, {}, step=10)
        # What a crash mid-save leaves: files of a newer tag, no commit record.
        store.put_file(f"{RUN}/finetune/step-20/model.bin", src / "model.bin")
        assert [c.tag for c in checkpoints.committed("finetune")] == ["step-10"]
        assert checkpoints.load("finetune", tmp_path / "out").tag == "step-10"

    def test_load_falls_back_from_a_corrupt_checkpoint(
        self,
        checkpoints: CheckpointStore,
        store: Store,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        old = make_checkpoint_dir(tmp_path / "old", seed=10)
        new = make_checkpoint_dir(tmp_path / "new", seed=11)
        checkpoints.save("classifier", "phase-1", old, {}, step=1)
        newest = checkpoints.save("classifier", "phase-2", new, {}, step=2)
        corrupt(store, newest, "model.bin")

        with caplog.at_level(logging.WARNING, logger="ulmfit_trainer.store"):
            loaded = checkpoints.load("classifier", tmp_path / "restore")
        assert loaded.tag == "phase-1"
        assert tree(tmp_path / "restore") == tree(old)
        warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
        assert "phase-2" in warning and "corrupt" in warning and "sha256" in warning
        assert "falling back" in warning and "phase-1" in warning
        # Nothing of the refused checkpoint is left behind.
        assert not [p for p in (tmp_path / "restore").iterdir() if p.name.startswith(".")]

        with pytest.raises(CheckpointCorrupt, match="sha256"):
            checkpoints.load("classifier", tmp_path / "explicit", tag="phase-2")

    def test_missing_or_resized_files_are_corruption_too(
        self, checkpoints: CheckpointStore, store: Store, tmp_path: Path
    ) -> None:
        src = make_checkpoint_dir(tmp_path / "c", seed=4)
        first = checkpoints.save("finetune", "a", src, {}, step=1)
        second = checkpoints.save("finetune", "b", src, {}, step=2)
        store.delete(f"{second.key}/optim/rank0.pt")
        store.put_bytes(f"{first.key}/latest", b"short")
        with pytest.raises(CheckpointCorrupt) as raised:
            checkpoints.load("finetune", tmp_path / "out")
        message = str(raised.value)
        assert "missing" in message and "bytes" in message

    def test_unreadable_or_unsafe_records_are_skipped(
        self,
        checkpoints: CheckpointStore,
        store: Store,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        src = make_checkpoint_dir(tmp_path / "c", seed=6, sizes={"w": 10})
        good = checkpoints.save("finetune", "step-1", src, {}, step=1)
        escape = {"stage": "finetune", "tag": "step-3", "step": 3, "files": [
            {"path": "../../outside", "size": 1, "sha256": "0" * 64}
        ]}  # fmt: skip
        store.put_bytes(f"{RUN}/finetune/step-2/meta.json", b"{not json")
        store.put_bytes(f"{RUN}/finetune/step-3/meta.json", json.dumps(escape).encode())
        with caplog.at_level(logging.WARNING, logger="ulmfit_trainer.store"):
            assert [c.tag for c in checkpoints.committed("finetune")] == [good.tag]
        warnings = " ".join(r.getMessage() for r in caplog.records)
        assert "step-2/meta.json is unreadable" in warnings
        assert "step-3/meta.json is unreadable" in warnings and "'../../outside'" in warnings

    def test_no_checkpoint(self, checkpoints: CheckpointStore, tmp_path: Path) -> None:
        with pytest.raises(NoCheckpoint, match="classifier"):
            checkpoints.load("classifier", tmp_path / "out")
        src = make_checkpoint_dir(tmp_path / "c", seed=1, sizes={"w": 1})
        checkpoints.save("classifier", "x", src, {})
        with pytest.raises(NoCheckpoint, match="'y'"):
            checkpoints.load("classifier", tmp_path / "out", tag="y")

    def test_saving_a_tag_again_replaces_it(
        self, checkpoints: CheckpointStore, store: Store, tmp_path: Path
    ) -> None:
        first = make_checkpoint_dir(tmp_path / "1", seed=1, sizes={"a": 10, "b/c": 20})
        second = make_checkpoint_dir(tmp_path / "2", seed=2, sizes={"a": 30})
        checkpoints.save("finetune", "last", first, {"v": 1})
        checkpoints.save("finetune", "last", second, {"v": 2})
        assert [o.key.rsplit("/", 1)[-1] for o in store.list(f"{RUN}/finetune/last/")] == [
            "a",
            "meta.json",
        ]
        loaded = checkpoints.load("finetune", tmp_path / "out")
        assert loaded.meta == {"v": 2}
        assert tree(tmp_path / "out") == tree(second)

    def test_final_is_found_whatever_its_tag_sorts_after(
        self, checkpoints: CheckpointStore, tmp_path: Path
    ) -> None:
        files = make_checkpoint_dir(tmp_path / "c", seed=5, sizes={"w": 10})
        assert checkpoints.final("classifier") is None
        checkpoints.save("classifier", "final", files, {"step": 7}, final=True)
        checkpoints.save("classifier", "phase-02", files, {"step": 7})
        assert checkpoints.latest("classifier").tag == "phase-02"  # (step, tag) order
        final = checkpoints.final("classifier")
        assert final is not None and final.tag == "final" and final.final

    def test_ranks_upload_their_own_files_and_one_commits_them_all(
        self, checkpoints: CheckpointStore, store: Store, tmp_path: Path
    ) -> None:
        # Two "nodes" with no shared disk: each uploads its shard; the commit lists both.
        rank0 = make_checkpoint_dir(tmp_path / "r0", seed=3, sizes={"model.pt": 50, "r0.pt": 20})
        rank1 = make_checkpoint_dir(tmp_path / "r1", seed=4, sizes={"r1.pt": 40})
        entries = checkpoints.upload("finetune", "step-9", rank0)
        assert checkpoints.committed("finetune") == []  # uploaded, not yet a checkpoint
        entries += checkpoints.upload("finetune", "step-9", rank1)
        store.put_bytes(f"{RUN}/finetune/step-9/stale.pt", b"from an earlier attempt")
        committed = checkpoints.commit("finetune", "step-9", entries, {"step": 9})
        assert committed.step == 9 and [f.path for f in committed.files] == [
            "model.pt",
            "r0.pt",
            "r1.pt",
        ]
        assert not store.exists(f"{RUN}/finetune/step-9/stale.pt")
        checkpoints.load("finetune", tmp_path / "out", tag="step-9")
        assert tree(tmp_path / "out") == {**tree(rank0), **tree(rank1)}

    def test_prune_keeps_last_k_and_finals(
        self, checkpoints: CheckpointStore, store: Store, tmp_path: Path
    ) -> None:
        src = make_checkpoint_dir(tmp_path / "c", seed=5, sizes={"w": 100})
        for step in range(1, 7):
            checkpoints.save("finetune", f"step-{step}", src, {}, step=step, final=step == 2)
        checkpoints.save("classifier", "phase-0", src, {}, step=0)
        deleted = checkpoints.prune("finetune", keep_last=2)
        assert sorted(deleted) == ["step-1", "step-3", "step-4"]
        assert [c.tag for c in checkpoints.committed("finetune")] == ["step-2", "step-5", "step-6"]
        assert not store.list(f"{RUN}/finetune/step-1/")
        assert [c.tag for c in checkpoints.committed("classifier")] == ["phase-0"]

        # keep_last below one still keeps the newest; without keep_final the final one goes.
        assert sorted(checkpoints.prune("finetune", keep_last=0, keep_final=False)) == [
            "step-2",
            "step-5",
        ]
        assert [c.tag for c in checkpoints.committed("finetune")] == ["step-6"]

    def test_prune_removes_old_uncommitted_leftovers_only(
        self, checkpoints: CheckpointStore, store: Store, tmp_path: Path
    ) -> None:
        src = make_checkpoint_dir(tmp_path / "c", seed=5, sizes={"w": 100})
        checkpoints.save("finetune", "step-1", src, {}, step=1)
        store.put_bytes(f"{RUN}/finetune/step-2/w", b"partial")
        assert checkpoints.prune("finetune", keep_last=1) == []  # recent: maybe still uploading
        assert checkpoints.prune("finetune", keep_last=1, incomplete_older_than=-60) == ["step-2"]
        assert not store.list(f"{RUN}/finetune/step-2/")
        assert [c.tag for c in checkpoints.committed("finetune")] == ["step-1"]

    def test_progress_round_trip(self, checkpoints: CheckpointStore) -> None:
        assert checkpoints.read_progress("finetune") is None
        written = checkpoints.write_progress(
            "finetune",
            StageProgress(
                stage="finetune", state="running", phase="lm", step=40, total_steps=100,
                loss=2.5, tokens_per_second=1e4,
            ),
        )  # fmt: skip
        read = checkpoints.read_progress("finetune")
        assert read == written
        assert read is not None and read.stage == "finetune" and read.step == 40
        assert read.updated_at.endswith("Z")
        # progress.json sits beside the checkpoints and is not one of them.
        assert checkpoints.committed("finetune") == []

    def test_artifact_uri(self, checkpoints: CheckpointStore, store: Store) -> None:
        assert checkpoints.artifact_uri("model") == store.uri(f"{RUN}/model")
        assert checkpoints.artifact_key("eval", "report.json") == f"{RUN}/eval/report.json"

    def test_bad_names_and_inputs(self, checkpoints: CheckpointStore, tmp_path: Path) -> None:
        src = make_checkpoint_dir(tmp_path / "c", seed=1, sizes={"w": 1})
        for stage, tag in (("finetune", "a/b"), ("fine tune", "x"), ("finetune", "progress.json")):
            with pytest.raises(StoreError, match="invalid"):
                checkpoints.save(stage, tag, src, {})
        with pytest.raises(StoreError, match="JSON"):
            checkpoints.save("finetune", "x", src, {"bad": object()})
        with pytest.raises(StoreError, match="does not exist"):
            checkpoints.save("finetune", "x", tmp_path / "nope", {})
        (src / "meta.json").write_text("{}")
        with pytest.raises(StoreError, match="reserves"):
            checkpoints.save("finetune", "x", src, {})


# ------------------------------------------------------------------------------ local-only parts


def test_local_writes_are_atomic_and_leave_no_temporaries(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    store.put_bytes("a/b", b"1")
    stray = tmp_path / "s" / "a" / ".b.123.ulmfit-tmp"
    stray.write_bytes(b"half")  # what a crash in the middle of a write leaves
    assert [o.key for o in store.list("")] == ["a/b"]
    assert sorted(p.name for p in (tmp_path / "s" / "a").iterdir()) == [".b.123.ulmfit-tmp", "b"]

    class Boom(RuntimeError):
        pass

    class Exploding:
        def __init__(self) -> None:
            self.reads = 0

        def readinto(self, buffer: bytearray) -> int:
            self.reads += 1
            if self.reads > 1:
                raise Boom
            buffer[:3] = b"abc"
            return 3

    from ulmfit_trainer.store import files

    with pytest.raises(Boom):
        files.write_atomic(
            tmp_path / "s" / "a" / "b",
            lambda dst: files.copy_hashing(Exploding(), dst),
            durable=True,
        )
    assert store.get_bytes("a/b") == b"1"  # the old content survives a failed write
    assert sorted(p.name for p in (tmp_path / "s" / "a").iterdir()) == [".b.123.ulmfit-tmp", "b"]


def test_local_delete_removes_empty_directories(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    store.put_bytes("x/y/z", b"1")
    store.put_bytes("x/keep", b"1")
    store.delete("x/y/z")
    assert not (tmp_path / "s" / "x" / "y").exists()
    assert (tmp_path / "s" / "x" / "keep").exists()


def test_local_uri_is_an_absolute_path(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    assert store.uri("a/b") == str((tmp_path / "s" / "a" / "b").resolve())
    assert os.path.isabs(store.uri())


def test_local_check_reports_an_unwritable_root(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StoreError, match="not writable"):
        LocalStore(tmp_path / "file" / "store").check()


# -------------------------------------------------------------------------------- S3 settings


def test_settings_use_camel_case_and_forbid_unknown_keys() -> None:
    settings = S3Settings.model_validate(
        {
            "endpoint": "minio.storage:9000",
            "bucket": "ulmfit-ckpt",
            "accessKeyEnv": "MY_KEY",
            "secretKeyEnv": "MY_SECRET",
            "partSizeMb": 32,
            "maxAttempts": 3,
        }
    )
    assert settings.access_key_env == "MY_KEY" and settings.part_size_mb == 32
    assert settings.prefix == "ulmfit" and settings.region is None
    assert settings.model_dump(by_alias=True)["retryBaseDelay"] == 0.5
    assert S3Settings(endpoint="h:1", bucket="abc", access_key_env="K").access_key_env == "K"
    with pytest.raises(ValidationError, match="accessKey"):
        S3Settings.model_validate({"endpoint": "h:1", "bucket": "abc", "accessKey": "secret!"})


@pytest.mark.parametrize(
    ("endpoint", "secure", "host", "tls"),
    [
        ("minio:9000", None, "minio:9000", False),
        ("http://minio:9000", None, "minio:9000", False),
        ("https://s3.example.com", None, "s3.example.com", True),
        ("https://s3.example.com/", None, "s3.example.com", True),
        ("minio:9000", True, "minio:9000", True),
        ("https://minio:9000", False, "minio:9000", False),
    ],
)
def test_settings_tls_follows_scheme_unless_secure_is_set(
    endpoint: str, secure: bool | None, host: str, tls: bool
) -> None:
    settings = S3Settings(endpoint=endpoint, bucket="abc", secure=secure)
    assert (settings.host, settings.use_tls) == (host, tls)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("endpoint", "ftp://host:21"),
        ("endpoint", "http://host:9000/path"),
        ("endpoint", "host:port"),
        ("endpoint", ""),
        ("bucket", "Upper_Case"),
        ("bucket", "ab"),
        ("prefix", "a/../b"),
        ("partSizeMb", 4),
        ("maxAttempts", 0),
    ],
)
def test_settings_reject_bad_values(field: str, value: object) -> None:
    data: dict[str, object] = {"endpoint": "h:9000", "bucket": "abc", field: value}
    with pytest.raises(ValidationError):
        S3Settings.model_validate(data)


def test_settings_root_and_prefix_normalisation() -> None:
    assert S3Settings(endpoint="h:1", bucket="abc", prefix="/x/y/").root == "s3://abc/x/y"
    assert S3Settings(endpoint="h:1", bucket="abc", prefix="").root == "s3://abc"


# ------------------------------------------------------------------------- opening and helpers


def test_open_store_dispatches_on_the_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    local = open_store(tmp_path / "x")
    assert isinstance(local, LocalStore) and local.root == (tmp_path / "x").resolve()
    assert isinstance(open_store(f"file://{tmp_path}/y"), LocalStore)
    settings = S3Settings(endpoint="127.0.0.1:1", bucket="other", prefix="p")
    s3 = open_store("s3://ckpts/runs/v1", settings)
    assert isinstance(s3, S3Store)
    assert (s3.bucket, s3.prefix) == ("ckpts", "runs/v1")
    assert s3.uri("ns/job") == "s3://ckpts/runs/v1/ns/job"
    from_settings = open_store("", settings)
    assert isinstance(from_settings, S3Store) and from_settings.uri() == "s3://other/p"
    with pytest.raises(StoreError, match="no S3 settings"):
        open_store("s3://ckpts/x")
    with pytest.raises(StoreError, match="unsupported"):
        open_store("gs://bucket/x")


def test_incomplete_credentials_are_an_auth_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from ulmfit_trainer.store import StoreAuthError

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    with pytest.raises(StoreAuthError, match="AWS_SECRET_ACCESS_KEY"):
        S3Store(S3Settings(endpoint="127.0.0.1:1", bucket="abc"))


def test_split_s3_uri() -> None:
    assert split_s3_uri("s3://b/a/b/") == ("b", "a/b")
    assert split_s3_uri("s3://b") == ("b", "")
    with pytest.raises(StoreError):
        split_s3_uri("/local/path")


def test_fetch_and_publish_local(tmp_path: Path) -> None:
    src = make_checkpoint_dir(tmp_path / "model", seed=9)
    assert fetch(str(src), tmp_path / "unused") == src
    publish(src, str(tmp_path / "published"))
    assert tree(tmp_path / "published") == tree(src)
    publish(src / "latest", f"file://{tmp_path}/one/latest")
    assert (tmp_path / "one" / "latest").read_bytes() == (src / "latest").read_bytes()


def test_backoff_grows_exponentially_with_bounded_jitter() -> None:
    rng = random.Random(0)
    delays = [backoff_delay(n, 0.5, 4.0, rng) for n in range(1, 7)]
    caps = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    for delay, cap in zip(delays, caps, strict=True):
        assert cap / 2 <= delay <= cap
