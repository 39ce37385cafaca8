"""`LocalStore`: the store layout in a local directory (a laptop run, a shared volume, tests)."""

from __future__ import annotations

import builtins
import hashlib
import os
from pathlib import Path

from ulmfit_trainer.store.base import ObjectInfo, Store, check_key, check_prefix
from ulmfit_trainer.store.errors import ObjectNotFound, StoreError
from ulmfit_trainer.store.files import TMP_SUFFIX, Progress, copy_hashing, write_atomic


class LocalStore(Store):
    """The same layout in a local directory. Writes go through a temporary file and
    `os.replace`, fsynced, so a reader never sees half a file."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def uri(self, key: str = "") -> str:
        return str(self._path(key)) if key else str(self.root)

    def put_file(
        self, key: str, path: str | Path, *, progress: Progress | None = None
    ) -> ObjectInfo:
        with open(path, "rb") as src:
            size, sha = write_atomic(
                self._path(key), lambda dst: copy_hashing(src, dst, progress), durable=True
            )
        return ObjectInfo(key, size, sha)

    def get_file(self, key: str, path: str | Path) -> ObjectInfo:
        try:
            src = open(self._path(key), "rb")  # noqa: SIM115 - closed below
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"{self.uri(key)} does not exist") from None
        with src:
            size, sha = write_atomic(Path(path), lambda dst: copy_hashing(src, dst), durable=False)
        return ObjectInfo(key, size, sha)

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        write_atomic(self._path(key), lambda dst: dst.write(data), durable=True)
        return ObjectInfo(key, len(data), hashlib.sha256(data).hexdigest())

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"{self.uri(key)} does not exist") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        check_prefix(prefix)
        head, _, _ = prefix.rpartition("/")
        base = self.root.joinpath(*head.split("/")) if head else self.root
        if not base.is_dir():
            return []
        found = []
        for dirpath, _dirs, filenames in os.walk(base):
            for name in filenames:
                if name.endswith(TMP_SUFFIX):
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
            probe = self.root / f".probe{TMP_SUFFIX}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StoreError(f"store directory {self.root} is not writable: {exc}") from exc
