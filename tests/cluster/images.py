"""Container images for the one-node test cluster, built on this machine without Docker.

Four images, each with a fixed name under ``localhost/ulmfit-test/``:

``pause``          the pod sandbox: ``pause.c`` built with ``gcc -static``, one file in one layer
``debian-python``  Debian bookworm (``debootstrap --variant=minbase``) with python3 and venv
``trainer``        debian-python + the test venv's dependency closure of
                   ``ulmfit-operator[trainer]`` in ``/opt/venv`` + the project's packages,
                   configured like the Dockerfile's ``trainer`` target (building that target,
                   with torch, takes too long for each run)
``operator``       the Dockerfile's real ``operator`` target, built by buildah on debian-python

Images are OCI: the layers written here are uncompressed, deterministic tars (sorted entries,
one mtime, root ownership unless a tree's own is kept), stored by digest in a content store under
``${XDG_CACHE_HOME:-~/.cache}/ulmfit-operator/images/``. Each layer is also recorded under a key
that hashes what it is made from, so a rerun with unchanged inputs reuses it without reading
them again: the venv layer (gigabytes: torch needs the nvidia-* wheels to import) is keyed by the
installed distributions' RECORD files, the project layer by the source, so editing the source
rebuilds only the small layer.

An image leaves the store as an OCI image-layout tar (``save``) or is streamed straight into
``ctr images import`` (``import_images``); the index names it with ``io.containerd.image.name``,
which ``ctr import`` uses as the image name as it is.

    python -m tests.cluster.images build [pause|base|trainer|operator ...] [--import SOCKET]
    python -m tests.cluster.images save NAME FILE
    python -m tests.cluster.images prune      # drop cached layers no current image uses

Building needs root (debootstrap, buildah), gcc with a static libc, and network access to the
Debian mirror of this machine's apt configuration and to the Python package index.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import io
import json
import os
import py_compile
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[2]
REGISTRY = "localhost/ulmfit-test"
PAUSE = f"{REGISTRY}/pause:1"
BASE = f"{REGISTRY}/debian-python:bookworm"
TRAINER = f"{REGISTRY}/trainer:dev"
TRAINER_DOCKERFILE = f"{REGISTRY}/trainer-dockerfile:dev"  # the real target, in buildah only
OPERATOR = f"{REGISTRY}/operator:dev"
INIT = f"{REGISTRY}/busybox:1"

SUITE = "bookworm"
# wget: KubeRay's injected health probes of Ray pods run `wget ... | grep success`.
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates", "wget")
# Distributions of the venv left out of the trainer image. triton is torch's GPU kernel compiler
# (1 GB): `import torch, deepspeed, transformers, ray.tune` and CPU training work without it (the
# trainer never calls torch.compile), which tests/integration/test_cluster_images.py checks.
TRAINER_EXCLUDED = frozenset({"triton"})
# Files of the remaining distributions that only a CUDA device would load, by site-packages path.
# `import torch, deepspeed, transformers, ray.tune` and a CPU backward step map none of them:
# cuDNN's engine libraries (torch links only libcudnn.so.9, which loads them on first use), the
# multi-GPU solver, NVSHMEM's device code and network transports, the profiler's host libraries,
# static archives and C headers (no compiler is in the image to use them). 1.1 GB of the 5.8 GB
# image; tests/integration/test_cluster_images.py runs the trainer stack and a stage in the image.
TRAINER_CUDA_ONLY_FILES = (
    "nvidia/cudnn/lib/libcudnn_*",
    "nvidia/*/lib/libcusolverMg.so*",
    "nvidia/*/lib/libnvperf_*",
    "nvidia/nvshmem/lib/*.bc",
    "nvidia/nvshmem/lib/nvshmem_transport_*",
    "nvidia/*/lib/*.a",
    "nvidia/*/include/*",
    "torch/include/*",
)
VENV = "/opt/venv"
NONROOT = "65532:65532"
PYTHON_LABEL = "io.ulmfit-operator.test.python"  # the base image's Python version

MTIME = 946684800  # 2000-01-01T00:00:00Z: the mtime of every file in every layer written here
CREATED = "2000-01-01T00:00:00Z"
# Part of every cache key: bump it when the bytes a builder writes change for the same inputs.
FORMAT = "2"

LAYER = "application/vnd.oci.image.layer.v1.tar"
CONFIG = "application/vnd.oci.image.config.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
NAME_ANNOTATION = "io.containerd.image.name"
REF_ANNOTATION = "org.opencontainers.image.ref.name"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class BuildError(RuntimeError):
    """An image could not be built or imported; the message says what to do about it."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ulmfit-operator" / "images"


def log(message: str) -> None:
    print(f"[images] {message}", file=sys.stderr, flush=True)


def sha256_hex(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def run(argv: Sequence[str | Path], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command; a failure raises ``BuildError`` with its output."""
    args = [str(a) for a in argv]
    result = subprocess.run(args, capture_output=True, text=True, check=False, **kwargs)
    if result.returncode != 0:
        raise BuildError(
            f"{' '.join(args)} exited {result.returncode}\n"
            f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
        )
    return result


# --- content store --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blob:
    """An OCI descriptor: a blob of the store by media type, digest and size."""

    media_type: str
    digest: str
    size: int

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}

    @classmethod
    def from_descriptor(cls, d: Mapping[str, Any]) -> Blob:
        return cls(d["mediaType"], d["digest"], d["size"])


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.out.write(data)
        self.hash.update(data)
        self.size += len(data)
        return len(data)


class Store:
    """Blobs by digest (``blobs/sha256/<hex>``) plus small records of what was built from what."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or cache_dir()
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        algorithm, _, hex_ = digest.partition(":")
        return self.root / "blobs" / algorithm / hex_

    def has(self, blob: Blob) -> bool:
        path = self.path(blob.digest)
        return path.is_file() and path.stat().st_size == blob.size

    def put_bytes(self, media_type: str, data: bytes) -> Blob:
        if self.has(blob := Blob(media_type, "sha256:" + sha256_hex(data), len(data))):
            return blob
        with self.writer(media_type) as (out, _):
            out.write(data)
        return blob

    def put_json(self, media_type: str, value: Any) -> Blob:
        return self.put_bytes(media_type, canonical_json(value))

    def read_json(self, blob: Blob | str) -> Any:
        digest = blob.digest if isinstance(blob, Blob) else blob
        return json.loads(self.path(digest).read_bytes())

    @contextlib.contextmanager
    def writer(self, media_type: str) -> Iterator[tuple[IO[bytes], list[Blob]]]:
        """Write a blob whose digest is known only at the end; the list receives its ``Blob``."""
        fd, tmp = tempfile.mkstemp(prefix=".incoming-", dir=self.root)
        result: list[Blob] = []
        try:
            with os.fdopen(fd, "wb") as raw:
                hashing = _HashingWriter(raw)
                yield hashing, result  # type: ignore[misc]
            blob = Blob(media_type, "sha256:" + hashing.hash.hexdigest(), hashing.size)
            os.replace(tmp, self.path(blob.digest))
            result.append(blob)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    # Records: "the thing made from inputs with hash KEY is this descriptor".
    def recall(self, kind: str, key: str) -> Blob | None:
        record = self.root / kind / f"{key}.json"
        if not record.is_file():
            return None
        blob = Blob.from_descriptor(json.loads(record.read_text()))
        return blob if self.has(blob) else None

    def remember(self, kind: str, key: str, blob: Blob) -> None:
        (self.root / kind).mkdir(exist_ok=True)
        (self.root / kind / f"{key}.json").write_text(json.dumps(blob.descriptor()))


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


# --- layers ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One member of a layer tar. ``path`` is relative to the image root (no leading slash)."""

    path: str
    kind: str = "file"  # "file" | "dir" | "symlink" | "hardlink"
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    source: Path | None = None  # a file's contents come from here ...
    data: bytes | None = None  # ... or are these bytes
    link: str = ""  # the target of a symlink, or the path (in the layer) a hardlink repeats

    def size(self) -> int:
        if self.kind != "file":
            return 0
        if self.data is not None:
            return len(self.data)
        assert self.source is not None
        return self.source.stat().st_size


def file_entries(files: Mapping[str, bytes | Path], mode: int = 0o644) -> list[Entry]:
    """Entries for a mapping of image path -> contents (bytes, or a file to copy)."""
    entries = []
    for path, content in files.items():
        if isinstance(content, Path):
            entries.append(Entry(path.strip("/"), mode=mode, source=content))
        else:
            entries.append(Entry(path.strip("/"), mode=mode, data=content))
    return entries


def tree_entries(
    top: Path,
    prefix: str = "",
    *,
    keep_owner: bool = False,
    exclude: Callable[[str], bool] = lambda path: False,
) -> list[Entry]:
    """Entries for everything under ``top``, placed under ``prefix`` in the image.

    Hard links become tar hard links. Device nodes, sockets and FIFOs are left out (the runtime
    provides /dev). Without ``keep_owner`` everything is owned by root. ``exclude`` gets each
    path relative to ``top``; what it matches is left out, with everything under it.

    A timestamp-checked ``.pyc`` whose source is beside it stays valid although every mtime
    becomes ``MTIME``: its header is rewritten to say ``MTIME`` (if it matched its source before;
    a stale one is dropped).
    """
    entries: list[Entry] = []
    inodes: dict[str, tuple[int, int]] = {}  # files with more than one link
    prefix = prefix.strip("/")

    def walk(directory: Path, rel: str) -> None:
        with os.scandir(directory) as scan:
            children = sorted(scan, key=lambda e: e.name)
        for child in children:
            child_rel = f"{rel}/{child.name}" if rel else child.name
            if exclude(child_rel):
                continue
            path = f"{prefix}/{child_rel}" if prefix else child_rel
            st = child.stat(follow_symlinks=False)
            uid, gid = (st.st_uid, st.st_gid) if keep_owner else (0, 0)
            mode = st.st_mode & 0o7777
            if child.is_symlink():
                entries.append(
                    Entry(path, "symlink", 0o777, link=os.readlink(child), uid=uid, gid=gid)
                )
            elif child.is_dir():
                entries.append(Entry(path, "dir", mode, uid=uid, gid=gid))
                walk(Path(child.path), child_rel)
            elif child.is_file():
                if st.st_nlink > 1:
                    inodes[path] = (st.st_dev, st.st_ino)
                elif child.name.endswith(".pyc"):
                    fixed = _pyc_with_fixed_mtime(Path(child.path))
                    if fixed is not None:
                        entries.append(Entry(path, "file", mode, data=fixed, uid=uid, gid=gid))
                    continue
                entries.append(Entry(path, "file", mode, source=Path(child.path), uid=uid, gid=gid))

    walk(top, "")
    # Of the paths of one inode, the first in the tar holds the contents, the others link to it.
    first: dict[tuple[int, int], str] = {}
    for path in sorted(inodes):
        first.setdefault(inodes[path], path)
    return [
        Entry(e.path, "hardlink", e.mode, e.uid, e.gid, link=first[inodes[e.path]])
        if e.path in inodes and first[inodes[e.path]] != e.path
        else e
        for e in entries
    ]


def _pyc_with_fixed_mtime(pyc: Path) -> bytes | None:
    """The pyc with ``MTIME`` as its source mtime, or None when it is stale or sourceless."""
    data = pyc.read_bytes()
    if len(data) < 16:
        return None
    flags = int.from_bytes(data[4:8], "little")
    if flags != 0:
        return data  # hash-based: independent of mtimes
    if pyc.parent.name != "__pycache__":
        return None
    source = pyc.parent.parent / (pyc.name.split(".")[0] + ".py")
    if not source.is_file():
        return None
    st = source.stat()
    recorded_mtime = int.from_bytes(data[8:12], "little")
    recorded_size = int.from_bytes(data[12:16], "little")
    if recorded_mtime != int(st.st_mtime) & 0xFFFFFFFF or recorded_size != st.st_size & 0xFFFFFFFF:
        return None
    return data[:8] + MTIME.to_bytes(4, "little") + data[12:]


def with_parents(entries: Iterable[Entry]) -> list[Entry]:
    """The entries, sorted, plus a root-owned 0755 directory for every parent not listed."""
    by_path = {e.path: e for e in entries}
    for path in list(by_path):
        parent = os.path.dirname(path)
        while parent and parent not in by_path:
            by_path[parent] = Entry(parent, "dir", 0o755)
            parent = os.path.dirname(parent)
    return [by_path[p] for p in sorted(by_path)]


def write_layer(store: Store, entries: Iterable[Entry]) -> Blob:
    """Write a deterministic layer tar of the entries (and their parents) into the store."""
    kinds = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE}
    kinds["hardlink"] = tarfile.LNKTYPE
    with (
        store.writer(LAYER) as (out, result),
        tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, bufsize=1 << 20) as tar,
    ):
        for entry in with_parents(entries):
            info = tarfile.TarInfo(entry.path)
            info.type = kinds[entry.kind]
            info.mode = entry.mode
            info.uid, info.gid = entry.uid, entry.gid
            info.uname = info.gname = ""
            info.mtime = MTIME
            info.linkname = entry.link
            info.size = entry.size()
            if entry.kind != "file":
                tar.addfile(info)
            elif entry.data is not None:
                tar.addfile(info, io.BytesIO(entry.data))
            else:
                assert entry.source is not None
                with entry.source.open("rb") as content:
                    tar.addfile(info, content)
    return result[0]


def cached_layer(
    store: Store, recipe: Any, make: Callable[[Path], Iterable[Entry]], *, what: str = "layer"
) -> Blob:
    """The layer built from ``recipe`` (anything JSON): from the store, else by ``make(workdir)``.

    ``workdir`` is a scratch directory that lives until the layer is written.
    """
    key = sha256_hex(canonical_json({"format": FORMAT, "recipe": recipe}))
    found = store.recall("layers", key)
    if found is not None:
        return found
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="layer-", dir=store.root) as workdir:
        blob = write_layer(store, make(Path(workdir)))
    store.remember("layers", key, blob)
    log(f"{what}: {blob.size / 1e6:.0f} MB in {time.monotonic() - started:.0f}s")
    return blob


# --- images ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageConfig:
    """The runtime part of an OCI image config."""

    entrypoint: Sequence[str] = ()
    cmd: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    user: str = ""
    working_dir: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        result: dict[str, Any] = {"Env": [f"{k}={v}" for k, v in self.env.items()]}
        for key, value in (
            ("Entrypoint", list(self.entrypoint)),
            ("Cmd", list(self.cmd)),
            ("User", self.user),
            ("WorkingDir", self.working_dir),
            ("Labels", dict(self.labels)),
        ):
            if value:
                result[key] = value
        return result

    @classmethod
    def from_json(cls, config: Mapping[str, Any]) -> ImageConfig:
        env = dict(item.split("=", 1) for item in config.get("Env") or [])
        return cls(
            entrypoint=config.get("Entrypoint") or (),
            cmd=config.get("Cmd") or (),
            env=env,
            user=config.get("User") or "",
            working_dir=config.get("WorkingDir") or "",
            labels=config.get("Labels") or {},
        )


@dataclass(frozen=True)
class Image:
    """A named image in the store: its manifest, and what the manifest lists."""

    ref: str
    manifest: Blob
    store: Store

    @property
    def manifest_json(self) -> dict[str, Any]:
        manifest: dict[str, Any] = self.store.read_json(self.manifest)
        return manifest

    @property
    def config_json(self) -> dict[str, Any]:
        config: dict[str, Any] = self.store.read_json(self.manifest_json["config"]["digest"])
        return config

    @property
    def config(self) -> ImageConfig:
        return ImageConfig.from_json(self.config_json.get("config") or {})

    @property
    def layers(self) -> list[Blob]:
        return [Blob.from_descriptor(d) for d in self.manifest_json["layers"]]

    def blobs(self) -> list[Blob]:
        """Every blob the image needs: manifest, config, layers."""
        manifest = self.manifest_json
        return [self.manifest, Blob.from_descriptor(manifest["config"]), *self.layers]

    def size(self) -> int:
        return sum(blob.size for blob in self.layers)

    def with_ref(self, ref: str) -> Image:
        return Image(ref, self.manifest, self.store)


def write_image(
    store: Store, ref: str, layers: Sequence[Blob], config: ImageConfig, history: Sequence[str]
) -> Image:
    """Write the config and manifest of an image made of ``layers`` (uncompressed tars)."""
    assert len(history) == len(layers)
    config_blob = store.put_json(
        CONFIG,
        {
            "architecture": "amd64",
            "os": "linux",
            "created": CREATED,
            "config": config.to_json(),
            "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]},
            "history": [{"created": CREATED, "created_by": line} for line in history],
        },
    )
    manifest = store.put_json(
        MANIFEST,
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": config_blob.descriptor(),
            "layers": [layer.descriptor() for layer in layers],
        },
    )
    return Image(ref, manifest, store)


def index_json(images: Sequence[Image]) -> bytes:
    manifests = []
    for image in images:
        annotations = {NAME_ANNOTATION: image.ref, REF_ANNOTATION: image.ref.rpartition(":")[2]}
        platform = {"architecture": "amd64", "os": "linux"}
        manifests.append(image.manifest.descriptor(annotations=annotations, platform=platform))
    return canonical_json({"schemaVersion": 2, "mediaType": INDEX, "manifests": manifests})


def write_archive(images: Sequence[Image], out: IO[bytes]) -> None:
    """Write the images as an OCI image-layout tar (what ``ctr images import`` reads) to ``out``."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, bufsize=1 << 20) as tar:

        def add(name: str, size: int, content: IO[bytes] | None, kind: bytes = tarfile.REGTYPE):
            info = tarfile.TarInfo(name)
            info.type, info.size, info.mtime = kind, size, MTIME
            info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
            tar.addfile(info, content)

        layout = canonical_json({"imageLayoutVersion": "1.0.0"})
        add("oci-layout", len(layout), io.BytesIO(layout))
        index = index_json(images)
        add("index.json", len(index), io.BytesIO(index))
        add("blobs", 0, None, tarfile.DIRTYPE)
        add("blobs/sha256", 0, None, tarfile.DIRTYPE)
        written: set[str] = set()
        for image in images:
            for blob in image.blobs():
                if blob.digest in written:
                    continue
                written.add(blob.digest)
                with image.store.path(blob.digest).open("rb") as content:
                    add(f"blobs/sha256/{blob.digest.partition(':')[2]}", blob.size, content)


def save(images: Sequence[Image], path: Path) -> Path:
    """Write an archive file of the images (for tools that want a file)."""
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("wb") as out:
        write_archive(images, out)
    tmp.replace(path)
    return path


def ingest_archive(store: Store, archive: Path, ref: str) -> Image:
    """Copy the one image of an OCI image-layout tar into the store, named ``ref``."""
    with tarfile.open(archive) as tar:
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
        if len(index["manifests"]) != 1:
            raise BuildError(f"{archive}: expected one image, found {len(index['manifests'])}")
        manifest = Blob.from_descriptor(index["manifests"][0])
        for member in tar:
            if not member.isfile() or not member.name.startswith("blobs/"):
                continue
            digest = "sha256:" + member.name.rsplit("/", 1)[1]
            blob = Blob("", digest, member.size)
            if store.has(blob):
                continue
            content = tar.extractfile(member)
            assert content is not None
            with store.writer("") as (out, result):
                shutil.copyfileobj(content, out, 1 << 20)
            if result[0].digest != digest:
                raise BuildError(f"{archive}: {member.name} does not match its digest")
    return Image(ref, manifest, store)


# --- importing into containerd --------------------------------------------------------------------


def ctr(address: str, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return run(["ctr", "--address", address, "--namespace", "k8s.io", *args], **kwargs)


def imported_digests(address: str) -> dict[str, str]:
    """Image name -> manifest digest of what containerd's ``k8s.io`` namespace holds."""
    lines = ctr(address, "images", "ls").stdout.splitlines()[1:]
    rows = [line.split() for line in lines]  # REF TYPE DIGEST SIZE PLATFORMS LABELS
    return {row[0]: row[2] for row in rows if len(row) >= 3}


def import_images(
    containerd_address: str, archives: Sequence[Image | Path], *, timeout: float = 1800
) -> list[str]:
    """Import images into containerd's ``k8s.io`` namespace (as the kubelet's CRI sees them).

    ``archives``: images of the store, streamed to ``ctr images import`` without writing an
    archive file (an image already there under its name with the same manifest is skipped), or
    archive files. Returns the names of the images given plus the names the archives added.
    """
    present = imported_digests(containerd_address)
    images = [a for a in archives if isinstance(a, Image)]
    missing = [i for i in images if present.get(i.ref) != i.manifest.digest]
    command = ["ctr", "--address", containerd_address, "--namespace", "k8s.io"]
    command += ["images", "import"]
    if missing:
        started = time.monotonic()
        # ctr's output goes to a file: a pipe nobody reads while the archive is written could
        # fill up and stop both.
        with tempfile.TemporaryFile() as output:
            with subprocess.Popen(
                [*command, "-"], stdin=subprocess.PIPE, stdout=output, stderr=subprocess.STDOUT
            ) as proc:
                assert proc.stdin is not None
                with contextlib.suppress(BrokenPipeError):  # ctr failed: its output says why
                    write_archive(missing, proc.stdin)
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.close()
                code = proc.wait(timeout=timeout)
            output.seek(0)
            said = output.read().decode(errors="replace")
        if code != 0:
            raise BuildError(f"ctr images import exited {code}:\n{said[-4000:]}")
        log(f"imported {', '.join(i.ref for i in missing)} in {time.monotonic() - started:.0f}s")
    files = [a for a in archives if isinstance(a, Path)]
    for archive in files:
        ctr(containerd_address, "images", "import", str(archive), timeout=timeout)
    after = imported_digests(containerd_address)
    for image in images:
        if after.get(image.ref) != image.manifest.digest:
            raise BuildError(f"{image.ref} is not in containerd after the import: {sorted(after)}")
    return [image.ref for image in images] + [name for name in after if name not in present]


# --- pause ----------------------------------------------------------------------------------------


def build_pause(store: Store) -> Image:
    source = ROOT / "tests" / "cluster" / "pause.c"
    gcc = shutil.which("gcc")
    if gcc is None:
        raise BuildError("gcc is needed to build the pause image (apt-get install gcc libc6-dev)")
    flags = ["-static", "-O2", "-s", "-Wall", "-Wextra", "-Werror"]
    recipe = {
        "source": sha256_hex(source.read_bytes()),
        "gcc": run([gcc, "--version"]).stdout,
        "flags": flags,
    }

    def make(workdir: Path) -> list[Entry]:
        binary = workdir / "pause"
        run([gcc, *flags, "-o", binary, source])
        return [Entry("pause", mode=0o755, source=binary)]

    layer = cached_layer(store, recipe, make, what="pause layer")
    config = ImageConfig(entrypoint=["/pause"], user="65535:65535")
    return write_image(store, PAUSE, [layer], config, ["COPY pause.c (gcc -static) /pause"])


# --- the Training Operator's init container -------------------------------------------------------

# What the test cluster's init container for PyTorchJob workers runs (tests/cluster/node.py).
INIT_APPLETS = ("sh", "seq", "sleep", "echo", "sed", "nslookup")


def build_init(store: Store) -> Image:
    """Debian's static busybox: what the Training Operator's default init image (alpine) gives
    the worker pods' wait-for-the-master loop."""
    recipe = {
        "package": "busybox-static",
        "version": _apt_candidate("busybox-static"),
        "applets": INIT_APPLETS,
    }

    def make(workdir: Path) -> list[Entry]:
        run(["apt-get", "download", "busybox-static"], cwd=workdir)
        package = next(workdir.glob("busybox-static_*.deb"))
        run(["dpkg-deb", "-x", package, workdir / "root"])
        entries = [Entry("bin/busybox", mode=0o755, source=workdir / "root" / "bin" / "busybox")]
        entries += [Entry(f"bin/{name}", kind="symlink", link="busybox") for name in INIT_APPLETS]
        return entries

    layer = cached_layer(store, recipe, make, what="busybox layer")
    config = ImageConfig(entrypoint=["/bin/sh"], user="65532:65532", env={"PATH": "/bin"})
    return write_image(store, INIT, [layer], config, ["busybox-static from Debian"])


def _apt_candidate(package: str) -> str:
    output = run(["apt-cache", "policy", package]).stdout
    match = re.search(r"Candidate:\s*(\S+)", output)
    if match is None or match.group(1) == "(none)":
        raise BuildError(f"apt has no {package}: run apt-get update")
    return match.group(1)


# --- debian base ----------------------------------------------------------------------------------


def apt_mirror(suite: str = SUITE) -> str:
    """The Debian mirror this machine's apt uses for ``suite``/main (from ``apt-cache policy``)."""
    output = run(["apt-cache", "policy"]).stdout
    for line in output.splitlines():
        match = re.match(r"\s*\d+\s+(\S+)\s+(\S+)/main\s", line)
        if match and match.group(2) == suite and match.group(1).startswith(("http", "file:")):
            return match.group(1)
    raise BuildError(f"no apt source for {suite}/main in `apt-cache policy`")


def debootstrap_path() -> str:
    found = shutil.which("debootstrap") or shutil.which("debootstrap", path="/usr/sbin:/sbin")
    if found is None:
        log("installing debootstrap (apt-get)")
        run(["apt-get", "install", "-y", "--no-install-recommends", "debootstrap"], timeout=600)
        found = shutil.which("debootstrap", path="/usr/sbin:/sbin:" + os.environ["PATH"])
    if found is None:
        raise BuildError("debootstrap is needed for the base image (apt-get install debootstrap)")
    return found


BASE_EXCLUDED = re.compile(
    r"^(dev|proc|sys|run|tmp)/."
    r"|^var/cache/apt/.*\.bin$|^var/cache/apt/archives/.*\.deb$"
    r"|^var/lib/apt/lists/.|^var/cache/debconf/.*-old$|^var/log/."
)


def _base_excluded(path: str) -> bool:
    return BASE_EXCLUDED.match(path) is not None


def build_base(store: Store, packages: Sequence[str] = BASE_PACKAGES) -> Image:
    """Debian ``SUITE`` (minbase) with ``packages``; its Python version is in a label."""
    recipe = {"suite": SUITE, "variant": "minbase", "packages": sorted(packages)}
    key = sha256_hex(canonical_json({"format": FORMAT, "recipe": recipe}))
    found = store.recall("images", key)
    if found is not None:
        return Image(BASE, found, store)
    if os.geteuid() != 0:
        raise BuildError("debootstrap needs root to build the base image")
    mirror = apt_mirror()
    workdir = Path(tempfile.mkdtemp(prefix="debootstrap-", dir=store.root))
    rootfs = workdir / "rootfs"
    try:
        started = time.monotonic()
        log(f"debootstrap {SUITE} from {mirror} (a few minutes)")
        run(
            [
                debootstrap_path(),
                "--variant=minbase",
                "--include=" + ",".join(sorted(packages)),
                SUITE,
                rootfs,
                mirror,
            ],
            timeout=1800,
        )
        log(f"debootstrap took {time.monotonic() - started:.0f}s")
        python = _dpkg_version(rootfs, f"python3.{_debian_python_minor(rootfs)}")
        entries = tree_entries(rootfs, keep_owner=True, exclude=_base_excluded)
        layer = write_layer(store, entries)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    config = ImageConfig(
        cmd=["python3"],
        env={"PATH": DEFAULT_PATH, "LANG": "C.UTF-8"},
        labels={PYTHON_LABEL: python},
    )
    history = [f"debootstrap --variant=minbase --include={','.join(sorted(packages))} {SUITE}"]
    image = write_image(store, BASE, [layer], config, history)
    store.remember("images", key, image.manifest)
    return image


def _debian_python_minor(rootfs: Path) -> str:
    target = os.readlink(rootfs / "usr" / "bin" / "python3")  # python3.11
    return target.rsplit(".", 1)[1]


def _dpkg_version(rootfs: Path, package: str) -> str:
    """The upstream version (3.11.2) of an installed package, from the rootfs' dpkg status."""
    status = (rootfs / "var" / "lib" / "dpkg" / "status").read_text()
    for stanza in status.split("\n\n"):
        if re.search(rf"^Package: {re.escape(package)}$", stanza, re.MULTILINE):
            version = re.search(r"^Version: (?:\d+:)?([^-+~\s]+)", stanza, re.MULTILINE)
            if version:
                return version.group(1)
    raise BuildError(f"{package} is not installed in the base image")


# --- trainer --------------------------------------------------------------------------------------


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Venv:
    """A virtual environment on this machine, whose installed distributions an image copies."""

    root: Path

    @property
    def version(self) -> str:
        """The full Python version (3.11.7), from pyvenv.cfg."""
        text = (self.root / "pyvenv.cfg").read_text()
        match = re.search(r"^version(?:_info)?\s*=\s*(\d+\.\d+\.\d+)", text, re.MULTILINE)
        if not match:
            raise BuildError(f"{self.root}/pyvenv.cfg names no Python version")
        return match.group(1)

    @property
    def minor(self) -> str:
        return ".".join(self.version.split(".")[:2])

    @property
    def site_packages(self) -> Path:
        return self.root / "lib" / f"python{self.minor}" / "site-packages"

    def distributions(self) -> dict[str, metadata.Distribution]:
        found: dict[str, metadata.Distribution] = {}
        for dist in metadata.distributions(path=[str(self.site_packages)]):
            found.setdefault(canonical(dist.metadata["Name"]), dist)
        return found

    def closure(
        self, requirements: Iterable[str], excluded: Iterable[str] = ()
    ) -> list[metadata.Distribution]:
        """The installed distributions that ``requirements`` need, transitively.

        Markers are evaluated for this venv's Python with each requirer's extras; a needed
        distribution that is not installed is an error. ``excluded`` ones (and what only they
        need) are left out.
        """
        from packaging.requirements import Requirement

        installed = self.distributions()
        skip = {canonical(name) for name in excluded}
        environment = {"python_version": self.minor, "python_full_version": self.version}
        wanted: dict[str, set[str]] = {}  # distribution -> extras asked of it so far
        # (distribution, extras asked): "" is the project; extra "" is "no extra".
        queue: list[tuple[str, frozenset[str]]] = [("", frozenset({""}))]
        missing = []
        while queue:
            name, extras = queue.pop()
            if name:
                asked = wanted.setdefault(name, set())
                extras = frozenset({""} | extras) - asked  # only what is new for it
                if not extras:
                    continue
                asked.update(extras)
                lines = installed[name].requires or []
            else:
                lines = list(requirements)
            for line in lines:
                requirement = Requirement(line)
                marker = requirement.marker
                if marker and not any(
                    marker.evaluate({**environment, "extra": extra}) for extra in extras
                ):
                    continue
                dependency = canonical(requirement.name)
                if dependency in skip:
                    continue
                if dependency not in installed:
                    missing.append(f"{requirement} (needed by {name or 'the project'})")
                    continue
                queue.append((dependency, frozenset(canonical(e) for e in requirement.extras)))
        if missing:
            raise BuildError(
                f"not installed in {self.root}: {', '.join(sorted(set(missing)))}; run `make env`"
            )
        return [installed[name] for name in sorted(wanted)]


def project_requirements(extras: Sequence[str]) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"]
    return [*project["dependencies"], *(r for extra in extras for r in optional[extra])]


def _record_paths(dist: metadata.Distribution) -> list[str]:
    record = dist.read_text("RECORD")
    if record is None:
        raise BuildError(f"{dist.metadata['Name']} has no RECORD: reinstall it")
    return [line.rsplit(",", 2)[0] for line in record.splitlines() if line.strip()]


def _installed_files_key(dist: metadata.Distribution) -> str:
    """A hash of what ``venv_entries`` takes from ``dist``, wherever its venv is.

    Its RECORD lists every file with its hash, but the console scripts in ``bin/`` (recorded as
    ``../../../bin/...``) start with the venv's own path, which the layer rewrites: a fresh clone's
    venv would otherwise miss the cache and rebuild gigabytes.
    """
    lines = (dist.read_text("RECORD") or "").splitlines()
    return sha256_hex("\n".join(line for line in lines if not line.startswith("../")))


def _is_bytecode(path: str) -> bool:
    return path.endswith((".pyc", ".pyo")) or "/__pycache__/" in f"/{path}"


def venv_entries(
    venv: Venv, dists: Iterable[metadata.Distribution], excluded: Sequence[str] = ()
) -> list[Entry]:
    """The files of ``dists`` (as their RECORDs list them) placed under ``VENV`` in the image.

    Bytecode is left out (``compiled`` adds fresh bytecode), and so is every file whose path in
    site-packages matches a pattern of ``excluded``; console scripts get a shebang for the
    image's venv.
    """
    entries = []
    site = venv.site_packages
    # A shebang names the venv as it was created: through a symlink, or by its real path.
    venv_prefixes = {f"#!{root}/".encode() for root in (venv.root, venv.root.resolve())}
    for dist in dists:
        for recorded in _record_paths(dist):
            path = os.path.normpath(site / recorded)
            rel = os.path.relpath(path, venv.root)
            if rel.startswith("..") or _is_bytecode(rel):
                continue
            if any(fnmatch.fnmatchcase(recorded, pattern) for pattern in excluded):
                continue
            target = f"{VENV.strip('/')}/{rel}"
            if os.path.islink(path):
                entries.append(Entry(target, "symlink", 0o777, link=os.readlink(path)))
                continue
            if not os.path.isfile(path):
                continue
            executable = os.stat(path).st_mode & 0o111
            mode = 0o755 if executable else 0o644
            if rel.startswith("bin/"):
                data = Path(path).read_bytes()
                first, newline, rest = data.partition(b"\n")
                if first.startswith(tuple(venv_prefixes)):
                    data = f"#!{VENV}/bin/python".encode() + newline + rest
                elif b"/bin/python" in first and not first.startswith((b"#!/usr/", b"#!/bin/")):
                    # Another venv's Python: a host path the image does not have.
                    raise BuildError(
                        f"{path} starts with {first.decode(errors='replace')!r}, not with the venv "
                        f"{venv.root}: it would not run in the image; recreate the venv (make env)"
                    )
                entries.append(Entry(target, mode=mode, data=data))
            else:
                entries.append(Entry(target, mode=mode, source=Path(path)))
    return entries


def compiled(entries: Iterable[Entry], workdir: Path, cache_tag: str) -> list[Entry]:
    """Bytecode for the ``.py`` files among ``entries``, as unchecked-hash pycs.

    The image never changes, so Python need not compare the pyc with its source (neither an
    mtime, which layers normalise, nor a hash); the interpreter running this must be the image's
    Python minor version (``cache_tag`` is e.g. ``cpython-311``).
    """
    if sys.implementation.cache_tag != cache_tag:
        raise BuildError(
            f"bytecode for {cache_tag} must be compiled by that Python; this is "
            f"{sys.implementation.cache_tag}: run with the test venv's python"
        )
    result = []
    for entry in entries:
        if entry.kind != "file" or not entry.path.endswith(".py"):
            continue
        if "/site-packages/" not in entry.path:
            continue  # console scripts are run, not imported
        directory, name = os.path.split(entry.path)
        pyc = f"{directory}/__pycache__/{name[:-3]}.{cache_tag}.pyc"
        out = workdir / pyc
        out.parent.mkdir(parents=True, exist_ok=True)
        source = entry.source
        if source is None:
            source = workdir / "sources" / entry.path
            source.parent.mkdir(parents=True, exist_ok=True)
            source.write_bytes(entry.data or b"")
        try:
            py_compile.compile(
                str(source),
                cfile=str(out),
                dfile="/" + entry.path,
                doraise=True,
                invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
            )
        except (py_compile.PyCompileError, SyntaxError, ValueError):
            continue  # not Python (a template named .py, Python 2 code): imported never
        result.append(Entry(pyc, source=out))
    return result


def project_entries(site: str) -> list[Entry]:
    """The project's packages as plain packages in ``site`` (no bytecode), plus a dist-info."""
    entries = []
    for package in (ROOT / "operator" / "ulmfit_operator", ROOT / "trainer" / "ulmfit_trainer"):
        entries += tree_entries(package, f"{site}/{package.name}", exclude=_is_bytecode)
    # Only the mode bits that matter: sources are data, directories are searchable.
    entries = [
        Entry(e.path, e.kind, 0o755 if e.kind == "dir" else 0o644, source=e.source, link=e.link)
        for e in entries
    ]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name, version = project["name"], project["version"]
    dist_info = f"{site}/{canonical(name).replace('-', '_')}-{version}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    entries += file_entries(
        {
            f"{dist_info}/METADATA": meta.encode(),
            f"{dist_info}/INSTALLER": b"tests.cluster.images\n",
        }
    )
    return entries


def build_trainer(store: Store, base: Image, venv: Venv | None = None) -> Image:
    """base + the venv's closure of ``ulmfit-operator[trainer]`` + the project's packages."""
    venv = venv or Venv(ROOT / ".venv")
    base_python = base.config.labels.get(PYTHON_LABEL, "")
    base_minor = ".".join(base_python.split(".")[:2])
    if base_minor != venv.minor:
        raise BuildError(
            f"the test venv {venv.root} is Python {venv.version} but the base image has Python "
            f"{base_python or '(unknown)'}: compiled extensions need the same minor version; "
            f"recreate the venv with python{base_minor} (PYTHON=python{base_minor} make env)"
        )
    v = VENV.strip("/")
    site = f"{v}/lib/python{venv.minor}/site-packages"
    cache_tag = f"cpython-{venv.minor.replace('.', '')}"
    dists = venv.closure(project_requirements(["trainer"]), TRAINER_EXCLUDED)

    def dependencies(workdir: Path) -> list[Entry]:
        python = f"/usr/bin/python{venv.minor}"
        cfg = (
            f"home = /usr/bin\ninclude-system-site-packages = false\nversion = {base_python}\n"
            f"executable = {python}\ncommand = {python} -m venv {VENV}\n"
        )
        entries = [
            *file_entries({f"{v}/pyvenv.cfg": cfg.encode()}),
            Entry(f"{v}/bin/python{venv.minor}", "symlink", 0o777, link=python),
            Entry(f"{v}/bin/python3", "symlink", 0o777, link=f"python{venv.minor}"),
            Entry(f"{v}/bin/python", "symlink", 0o777, link=f"python{venv.minor}"),
            Entry(f"{v}/lib64", "symlink", 0o777, link="lib"),
            *venv_entries(venv, dists, TRAINER_CUDA_ONLY_FILES),
        ]
        return entries + compiled(entries, workdir, cache_tag)

    def project(workdir: Path) -> list[Entry]:
        entries = project_entries(site)
        return entries + compiled(entries, workdir, cache_tag)

    deps = cached_layer(
        store,
        {
            "python": venv.minor,
            "base_python": base_python,
            "excluded": list(TRAINER_CUDA_ONLY_FILES),
            "distributions": [
                [dist.metadata["Name"], dist.version, _installed_files_key(dist)] for dist in dists
            ],
        },
        dependencies,
        what="trainer dependency layer",
    )
    sources = [
        [e.path, sha256_hex(e.source.read_bytes() if e.source else e.data or b"")]
        for e in project_entries(site)
        if e.kind == "file"
    ]
    own = cached_layer(
        store, {"python": venv.minor, "project": sources}, project, what="trainer project layer"
    )
    env = {
        **base.config.env,
        "PATH": f"{VENV}/bin:{base.config.env.get('PATH', DEFAULT_PATH)}",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "HOME": "/tmp",
        "HF_HOME": "/tmp/huggingface",
        "TRITON_CACHE_DIR": "/tmp/triton",
    }
    config = ImageConfig(
        entrypoint=["python", "-m", "ulmfit_trainer"],
        env=env,
        user=NONROOT,
        working_dir="/tmp",
        labels={
            **base.config.labels,
            "org.opencontainers.image.title": "ulmfit-trainer",
            "org.opencontainers.image.description": "test image: the test venv's trainer stack",
        },
    )
    history = [h["created_by"] for h in base.config_json.get("history", [])]
    history += [f"COPY closure of ulmfit-operator[trainer] {VENV}", f"COPY operator trainer {site}"]
    return write_image(store, TRAINER, [*base.layers, deps, own], config, history)


# --- operator (the real Dockerfile, built by buildah) ---------------------------------------------


def buildah() -> list[str]:
    """buildah with a storage of its own in the cache (its layer cache survives between runs)."""
    if shutil.which("buildah") is None:
        raise BuildError("buildah is needed for the Dockerfile's images (apt-get install buildah)")
    storage = cache_dir().parent / "buildah"
    driver = os.environ.get("ULMFIT_BUILDAH_DRIVER", "overlay")
    return ["buildah", "--root", str(storage / "root"), "--runroot", str(storage / "run"),
            "--storage-driver", driver]  # fmt: skip


def pip_settings(workdir: Path) -> list[str]:
    """``--secret`` options giving pip in the build this machine's pip settings.

    A pip.conf made from the ``PIP_*`` environment (index URLs, timeouts) and the CA bundle pip
    trusts here, as build secrets: the Dockerfile mounts them for its pip commands only, so
    they reach no layer of the image. A find-links directory of this machine is left out.
    """
    settings = {
        name[4:].lower().replace("_", "-"): value
        for name, value in os.environ.items()
        if name.startswith("PIP_") and name not in {"PIP_CERT", "PIP_CONFIG_FILE", "PIP_FIND_LINKS"}
    }
    options = []
    bundle = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
    bundle = bundle or "/etc/ssl/certs/ca-certificates.crt"
    if os.path.isfile(bundle):
        settings["cert"] = "/run/secrets/pip-ca.crt"
        options += ["--secret", f"id=pip-ca.crt,src={bundle}"]
    conf = workdir / "pip.conf"
    conf.write_text("[global]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(settings.items())))
    return [*options, "--secret", f"id=pip.conf,src={conf}"]


def _buildah_has(ref: str) -> bool:
    result = subprocess.run([*buildah(), "inspect", "--type", "image", ref], capture_output=True)
    return result.returncode == 0


def load_into_buildah(image: Image) -> None:
    """Make ``image`` (a base for the Dockerfile) known to buildah under its name."""
    found = subprocess.run(
        [*buildah(), "inspect", "--type", "image", "--format", "{{.FromImageDigest}}", image.ref],
        capture_output=True,
        text=True,
    )
    if found.returncode == 0 and found.stdout.strip() == image.manifest.digest:
        return
    with tempfile.TemporaryDirectory(prefix="base-", dir=image.store.root) as tmp:
        archive = save([image], Path(tmp) / "base.tar")
        pulled = run([*buildah(), "pull", "--quiet", f"oci-archive:{archive}"], timeout=600)
        image_id = pulled.stdout.split()[-1:]
        if not image_id:
            raise BuildError(f"buildah pull printed no image id for {image.ref}")
        run([*buildah(), "tag", image_id[0], image.ref])


def dockerfile_inputs() -> list[list[str]]:
    """What a Dockerfile build reads from the context: its files and their hashes."""
    files = [
        ROOT / name
        for name in (
            "Dockerfile",
            ".dockerignore",
            "pyproject.toml",
            "requirements.lock",
            "README.md",
            "docker/install-python-project.sh",
        )
    ]
    for package in (ROOT / "operator", ROOT / "trainer"):
        files += sorted(p for p in package.rglob("*") if p.is_file() and not _is_bytecode(str(p)))
    return [[str(p.relative_to(ROOT)), sha256_hex(p.read_bytes())] for p in files]


def buildah_build(
    target: str,
    ref: str,
    build_args: Mapping[str, str],
    bases: Sequence[Image],
    *,
    timeout: float = 3600,
) -> float:
    """Build ``target`` of the repository's Dockerfile as ``ref`` in buildah's storage.

    ``bases`` (images of the store named in ``build_args``) are loaded into buildah first; pip
    gets this machine's settings as build secrets (``pip_settings``). Returns the seconds the
    build took. buildah's layer cache makes a rebuild after a source edit reinstall only the
    project.
    """
    if os.geteuid() != 0:
        raise BuildError("buildah builds here need root (no rootless setup on the test machine)")
    # Working containers a killed build left behind hold their whole upper layer (gigabytes for
    # the trainer); this storage is the tests' own, so none of them belongs to anyone else.
    subprocess.run([*buildah(), "rm", "--all"], capture_output=True, check=False)
    for base in bases:
        load_into_buildah(base)
    with tempfile.TemporaryDirectory(prefix=f"{target}-", dir=cache_dir()) as tmp:
        argv = [*buildah(), "build", "--isolation", "chroot", "--layers", "--force-rm"]
        argv += ["--pull-never"]
        argv += ["--target", target, "--tag", ref, "--file", str(ROOT / "Dockerfile")]
        for name, value in sorted(build_args.items()):
            argv += ["--build-arg", f"{name}={value}"]
        argv += pip_settings(Path(tmp))
        started = time.monotonic()
        log(f"buildah build --target {target}")
        run([*argv, str(ROOT)], timeout=timeout)
        took = time.monotonic() - started
        log(f"buildah build --target {target}: {took:.0f}s")
    return took


def build_dockerfile_target(
    store: Store,
    target: str,
    ref: str,
    build_args: Mapping[str, str],
    bases: Sequence[Image],
    *,
    timeout: float = 3600,
) -> Image:
    """``buildah_build``, then the image goes to the store (cached by the build's inputs)."""
    recipe = {
        "target": target,
        "args": dict(sorted(build_args.items())),
        "bases": [b.manifest.digest for b in bases],
        "context": dockerfile_inputs(),
    }
    key = sha256_hex(canonical_json({"format": FORMAT, "recipe": recipe}))
    found = store.recall("images", key)
    if found is not None:
        return Image(ref, found, store)
    buildah_build(target, ref, build_args, bases, timeout=timeout)
    with tempfile.TemporaryDirectory(prefix=f"{target}-", dir=store.root) as tmp:
        archive = Path(tmp) / "image.tar"
        run([*buildah(), "push", "--quiet", ref, f"oci-archive:{archive}"], timeout=timeout)
        image = ingest_archive(store, archive, ref)
    store.remember("images", key, image.manifest)
    return image


def forget_buildah_image(ref: str) -> None:
    """Remove ``ref`` and the untagged layer-cache images from buildah's storage (disk space: the
    trainer target's are several GB, which later builds on a small disk need)."""
    subprocess.run([*buildah(), "rmi", "--force", ref], capture_output=True, check=False)
    subprocess.run([*buildah(), "rmi", "--prune"], capture_output=True, check=False)


def build_operator(store: Store, base: Image) -> Image:
    name, _, tag = base.ref.rpartition(":")
    args = {"PYTHON_IMAGE": name, "PYTHON_TAG": tag}
    return build_dockerfile_target(store, "operator", OPERATOR, args, [base])


def trainer_target_args(base: Image) -> dict[str, str]:
    """Build args for the Dockerfile's ``trainer`` target on the Debian base: PyPI's torch."""
    minor = ".".join(base.config.labels.get(PYTHON_LABEL, "3").split(".")[:2])
    # Empty: the build's pip uses the index this machine's pip is configured with.
    index = os.environ.get("PIP_INDEX_URL", "")
    name, _, tag = base.ref.rpartition(":")
    return {
        "TRAINER_IMAGE": name,
        "TRAINER_TAG": tag,
        "TRAINER_PYTHON": f"python{minor}",
        "TORCH_INDEX_URL": index,
    }


# --- everything -----------------------------------------------------------------------------------

NAMES = ("pause", "init", "base", "trainer", "operator")


def build(
    names: Iterable[str] = ("pause", "init", "trainer", "operator"), store: Store | None = None
) -> dict[str, Image]:
    """Build (or find in the cache) the named images; the base is built when another needs it."""
    store = store or Store()
    names = list(names)
    unknown = set(names) - set(NAMES)
    if unknown:
        raise BuildError(f"unknown image {sorted(unknown)}: choose from {', '.join(NAMES)}")
    images: dict[str, Image] = {}
    if "pause" in names:
        images["pause"] = build_pause(store)
    if "init" in names:
        images["init"] = build_init(store)
    if {"base", "trainer", "operator"} & set(names):
        base = build_base(store)
        if "base" in names:
            images["base"] = base
        if "trainer" in names:
            images["trainer"] = build_trainer(store, base)
        if "operator" in names:
            images["operator"] = build_operator(store, base)
    return images


def prune(store: Store, keep: Iterable[Image]) -> int:
    """Delete the blobs (and records) of the store that none of ``keep`` uses; bytes freed.

    Each change of the test venv leaves a dependency layer of gigabytes behind; this drops them.
    """
    wanted = {blob.digest for image in keep for blob in image.blobs()}
    for kind in ("layers", "images"):
        for record in (store.root / kind).glob("*.json"):
            if Blob.from_descriptor(json.loads(record.read_text())).digest not in wanted:
                record.unlink()
    freed = 0
    for path in (store.root / "blobs" / "sha256").iterdir():
        if f"sha256:{path.name}" not in wanted:
            freed += path.stat().st_size
            path.unlink()
    return freed


def ensure_images(containerd_address: str) -> dict[str, str]:
    """Build (cached) and import the cluster's images; {pause|init|trainer|operator: ref}."""
    images = build(("pause", "init", "trainer", "operator"))
    drop_stale_images(containerd_address, list(images.values()))
    import_images(containerd_address, list(images.values()))
    return {name: image.ref for name, image in images.items()}


def drop_stale_images(containerd_address: str, images: Sequence[Image]) -> None:
    """Remove every image of the namespace that is not one of ``images`` as built now.

    containerd's root is kept between clusters; without this each rebuilt trainer image (some GB
    once unpacked) would stay beside its successor until the disk fills. The image references
    the CRI plugin adds (``sha256:...`` and ``name@sha256:...``) go too; the kubelet's pods are
    gone when a cluster starts, and containerd then collects the unreferenced content.
    """
    wanted = {image.ref: image.manifest.digest for image in images}
    present = imported_digests(containerd_address)
    if all(wanted.get(ref) in (None, digest) for ref, digest in present.items()):
        return  # nothing of ours was rebuilt (or a fresh root)
    stale = [ref for ref, digest in present.items() if wanted.get(ref) != digest]
    if stale:
        log(f"removing {len(stale)} stale image references from containerd")
        ctr(containerd_address, "images", "rm", "--sync", *stale, timeout=600)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.cluster.images",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build_cmd = commands.add_parser("build", help="build images, print their names")
    build_cmd.add_argument(
        "names", nargs="*", metavar="NAME", help=f"{', '.join(NAMES)} (default: all but base)"
    )
    build_cmd.add_argument(
        "--import",
        dest="address",
        metavar="SOCKET",
        help="import them into the containerd at this socket (namespace k8s.io)",
    )
    commands.add_parser("prune", help="build all images, then delete what none of them uses")
    save_cmd = commands.add_parser("save", help="write one image as an OCI archive file")
    save_cmd.add_argument("name", choices=NAMES)
    save_cmd.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            images = build(args.names or ("pause", "init", "trainer", "operator"))
            if args.address:
                import_images(args.address, list(images.values()))
            for image in images.values():
                print(f"{image.ref}\t{image.manifest.digest}\t{image.size() / 1e6:.0f} MB")
        elif args.command == "prune":
            store = Store()
            freed = prune(store, build(NAMES, store).values())
            print(f"freed {freed / 1e9:.1f} GB")
        else:
            image = build([args.name])[args.name]
            save([image], args.file)
            print(image.ref)
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
