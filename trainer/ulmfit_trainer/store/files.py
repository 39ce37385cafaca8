"""Local files for the store: atomic writes, copies that hash on the way, directory walks.

A file the store writes goes through a temporary sibling (``.<name>.<random>.ulmfit-tmp``) and
``os.replace``, so a reader never sees half a file; listings skip those temporaries. Internal to
the store package.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
Progress = Callable[[int], None]
"""Called with the number of bytes an upload just read; bytes count again when a transfer is
retried, and the calls may come from several threads at once."""

MIB = 1024 * 1024
CHUNK = 4 * MIB
TMP_SUFFIX = ".ulmfit-tmp"


def local_files(directory: Path) -> list[tuple[str, Path]]:
    """Every file under `directory` as (relative POSIX path, path), sorted by path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames.sort()
        for name in filenames:
            path = Path(dirpath, name)
            found.append((path.relative_to(directory).as_posix(), path))
    return sorted(found)


def read_exactly(src: Any, view: memoryview) -> None:
    """Fill `view` from the unbuffered file `src` (`readinto` may return less than asked);
    `OSError` when the file ends first (it shrank while being read)."""
    done = 0
    while done < len(view):
        n = src.readinto(view[done:])
        if not n:
            raise OSError(
                f"{getattr(src, 'name', 'file')} ended after {done} of {len(view)} expected "
                "bytes: it shrank while it was read"
            )
        done += n


def copy_hashing(src: Any, dst: Any, progress: Progress | None = None) -> tuple[int, str]:
    digest = hashlib.sha256()
    count = 0
    buffer = bytearray(CHUNK)
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


def fsync_dir(directory: Path) -> None:
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


def temporary_path(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")


def write_atomic(dest: Path, fill: Callable[[Any], T], *, durable: bool) -> T:
    """Write `dest` through a temporary sibling and `os.replace`, so readers never see a partial
    file; with `durable`, fsync the file and the directory as well."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(dest)
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
        fsync_dir(dest.parent)
    return result


def by_size_desc(files: Iterable[tuple[str, Path]]) -> list[tuple[str, Path]]:
    return sorted(files, key=lambda item: -item[1].stat().st_size)
