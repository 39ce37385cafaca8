"""The test cluster's images (tests/cluster/images.py), built here and run by a real containerd.

The layer writer is checked without any tool. The images run in the test cluster's containerd
(``ctr run``, beside the kubelet's pods). Building needs root, gcc,
debootstrap and buildah; a first build of the trainer image copies gigabytes (torch and the
nvidia-* wheels it imports), so those tests are ``slow``. Built images are cached (see the
module), so a rerun only imports them.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import importlib.util
import io
import json
import os
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import images
from tests.harness import parts

pytestmark = pytest.mark.timeout(300)

SBIN = "/usr/local/sbin:/usr/sbin:/sbin"


def which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=SBIN)


def require_root() -> None:
    parts.require(os.geteuid() == 0, "root", "run the image tests as root (containerd, builds)")


def require_tools(*names: str) -> None:
    for name in names:
        parts.require(which(name) is not None, name, f"apt-get install {name}")


# --- a containerd of the test's own --------------------------------------------------------------


@dataclass
class Containerd:
    """A running containerd: ``address`` is its socket; ``ctr`` runs in namespace k8s.io."""

    address: str

    def ctr(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["ctr", "--address", self.address, "--namespace", "k8s.io", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check:
            assert result.returncode == 0, f"ctr {' '.join(args)}: {result.stderr[-3000:]}"
        return result

    def run(self, image: str, name: str, *command: str, timeout: float = 300, mounts=()):
        """``ctr run --rm``: the image's own user and environment, ``command`` as its argv."""
        options = [f"--mount=type=bind,src={s},dst={d},options=rbind:rw" for s, d in mounts]
        return self.ctr("run", "--rm", *options, image, name, *command, timeout=timeout)


@pytest.fixture(scope="session")
def containerd(node_cluster: Any) -> Containerd:
    """The test cluster's containerd: the images are imported there once for the session."""
    require_tools("ctr")
    return Containerd(str(node_cluster.containerd_socket))


@pytest.fixture(scope="session")
def store() -> images.Store:
    return images.Store()


# --- the layer writer, without tools -------------------------------------------------------------


def test_the_venv_layer_key_ignores_where_the_venv_is_but_not_what_it_holds(
    tmp_path: Path,
) -> None:
    """Two clones' venvs differ only in their console scripts' shebangs (the layer rewrites them):
    the same key. Another file in site-packages: another key."""

    def dist_info(venv: str, module_hash: str) -> importlib.metadata.PathDistribution:
        info = tmp_path / venv / "tool-1.0.dist-info"
        info.mkdir(parents=True)
        info.joinpath("METADATA").write_text("Metadata-Version: 2.1\nName: tool\nVersion: 1.0\n")
        script_hash = images.sha256_hex(f"#!{tmp_path / venv}/bin/python\n")
        info.joinpath("RECORD").write_text(
            f"tool/__init__.py,sha256={module_hash},10\n"
            f"../../../bin/tool,sha256={script_hash},40\n"
            "tool-1.0.dist-info/RECORD,,\n"
        )
        return importlib.metadata.PathDistribution(info)

    first, clone = dist_info("a", "AAA"), dist_info("b", "AAA")
    changed = dist_info("c", "BBB")
    assert first.read_text("RECORD") != clone.read_text("RECORD")
    assert images._installed_files_key(first) == images._installed_files_key(clone)
    assert images._installed_files_key(first) != images._installed_files_key(changed)


def test_console_scripts_run_the_image_venv_python_whatever_path_made_them(
    tmp_path: Path,
) -> None:
    """A venv reached through a symlink wrote its real path into the shebangs: both forms become
    the image's venv, and a shebang naming another venv's Python stops the build."""
    real = tmp_path / "real-venv"
    site = real / "lib" / "python3.11" / "site-packages"
    info = site / "tool-1.0.dist-info"
    info.mkdir(parents=True)
    (real / "pyvenv.cfg").write_text("version = 3.11.7\n")
    (real / "bin").mkdir()
    (tmp_path / "link").symlink_to(real)
    scripts = {"tool": f"#!{real}/bin/python\nmain()\n", "other": "#!/srv/venv/bin/python\nx()\n"}
    for name, text in scripts.items():
        (real / "bin" / name).write_text(text)
    info.joinpath("METADATA").write_text("Metadata-Version: 2.1\nName: tool\nVersion: 1.0\n")
    info.joinpath("RECORD").write_text("../../../bin/tool,,\n")
    dist = importlib.metadata.PathDistribution(info)
    [entry] = images.venv_entries(images.Venv(tmp_path / "link"), [dist])
    assert (entry.path, entry.data) == ("opt/venv/bin/tool", b"#!/opt/venv/bin/python\nmain()\n")

    info.joinpath("RECORD").write_text("../../../bin/other,,\n")
    with pytest.raises(images.BuildError, match="would not run in the image"):
        images.venv_entries(images.Venv(tmp_path / "link"), [dist])


def test_layers_are_the_same_bytes_for_the_same_files(tmp_path: Path) -> None:
    store = images.Store(tmp_path / "store")
    tree = tmp_path / "tree"
    (tree / "pkg" / "__pycache__").mkdir(parents=True)
    (tree / "pkg" / "mod.py").write_text("X = 1\n")
    (tree / "bin").mkdir()
    (tree / "bin" / "tool").write_text("#!/bin/sh\n")
    (tree / "bin" / "tool").chmod(0o755)
    os.link(tree / "bin" / "tool", tree / "bin" / "tool2")
    (tree / "link").symlink_to("bin/tool")
    import py_compile

    py_compile.compile(str(tree / "pkg" / "mod.py"), cfile=str(tree / "pkg/__pycache__/mod.pyc"))
    (tree / "pkg" / "__pycache__" / "stale.cpython-311.pyc").write_bytes(b"\0" * 16)

    first = images.write_layer(store, images.tree_entries(tree, "opt/x"))
    os.utime(tree / "bin" / "tool", (1, 1))  # an mtime change alone changes nothing
    os.utime(tree / "pkg" / "mod.py", (5, 5))
    py_compile.compile(str(tree / "pkg" / "mod.py"), cfile=str(tree / "pkg/__pycache__/mod.pyc"))
    second = images.write_layer(store, images.tree_entries(tree, "opt/x"))
    assert first == second

    with tarfile.open(store.path(first.digest)) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert names == sorted(names)
        assert names[:2] == ["opt", "opt/x"]  # parents come first, made by the writer
        assert {(m.mtime, m.uid, m.gid, m.uname) for m in members} == {(images.MTIME, 0, 0, "")}
        by_name = {m.name: m for m in members}
        assert by_name["opt/x/bin/tool"].mode == 0o755
        assert by_name["opt/x/bin/tool2"].islnk()
        assert by_name["opt/x/bin/tool2"].linkname == "opt/x/bin/tool"
        assert by_name["opt/x/link"].issym()
        # A valid pyc keeps matching its source (now at MTIME); a stale one is dropped.
        assert "opt/x/pkg/__pycache__/stale.cpython-311.pyc" not in by_name
        pyc = tar.extractfile("opt/x/pkg/__pycache__/mod.pyc")
        assert pyc is not None
        assert int.from_bytes(pyc.read()[8:12], "little") == images.MTIME


def test_an_archive_names_its_images_for_containerd(tmp_path: Path) -> None:
    store = images.Store(tmp_path / "store")
    layer = images.write_layer(store, images.file_entries({"hello": b"hi\n"}))
    config = images.ImageConfig(entrypoint=["/hello"], user="1:2", env={"A": "b"})
    image = images.write_image(store, "localhost/test/hello:7", [layer], config, ["COPY hello"])
    out = io.BytesIO()
    images.write_archive([image], out)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
        [entry] = index["manifests"]
        assert entry["annotations"] == {
            "io.containerd.image.name": "localhost/test/hello:7",
            "org.opencontainers.image.ref.name": "7",
        }
        blobs = {m.name for m in tar.getmembers() if m.isfile() and m.name.startswith("blobs/")}
        assert blobs == {f"blobs/sha256/{b.digest[7:]}" for b in image.blobs()}
    assert image.config.to_json() == {"Entrypoint": ["/hello"], "User": "1:2", "Env": ["A=b"]}


def test_the_trainer_closure_is_the_trainer_extra_of_the_test_venv() -> None:
    venv = images.Venv(images.ROOT / ".venv")
    parts.require(venv.site_packages.is_dir(), "the test venv", "run `make env`")
    for module in ("torch", "deepspeed", "transformers", "ray"):
        parts.require(importlib.util.find_spec(module) is not None, module, "run `make env`")
    dists = venv.closure(images.project_requirements(["trainer"]), images.TRAINER_EXCLUDED)
    names = {images.canonical(d.metadata["Name"]) for d in dists}
    assert {"torch", "deepspeed", "transformers", "tokenizers", "ray", "numpy", "psutil"} <= names
    assert {"pydantic", "minio", "typer"} <= names  # the core dependencies
    assert "aiohttp" in names  # through ray[default]
    assert not names & {"triton", "pytest", "checkov", "kopf", "kubernetes", "mypy", "optuna"}


def test_files_left_out_of_the_trainer_image_are_none_that_cpu_training_loads() -> None:
    """Each CUDA-only pattern still matches files, and none matches a library the stack maps.

    The stack is imported and runs a backward step in a fresh interpreter of the test venv, which
    then lists the shared objects mapped into it (``/proc/self/maps``).
    """
    venv = images.Venv(images.ROOT / ".venv")
    parts.require(venv.site_packages.is_dir(), "the test venv", "run `make env`")
    dists = venv.closure(images.project_requirements(["trainer"]), images.TRAINER_EXCLUDED)
    recorded = [path for dist in dists for path in images._record_paths(dist)]
    for pattern in images.TRAINER_CUDA_ONLY_FILES:
        assert any(fnmatch.fnmatchcase(path, pattern) for path in recorded), pattern
    script = (
        "import torch, deepspeed, transformers, ray.tune\n"
        "torch.nn.Linear(4, 2)(torch.randn(3, 4)).sum().backward()\n"
        "print('\\n'.join({line.split()[-1] for line in open('/proc/self/maps')"
        " if '/site-packages/' in line}))\n"
    )
    run = subprocess.run(
        [str(images.ROOT / ".venv" / "bin" / "python"), "-c", script],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    mapped = [
        line.split("/site-packages/", 1)[1]
        for line in run.stdout.splitlines()
        if "/site-packages/" in line
    ]
    assert any(path.startswith("nvidia/") for path in mapped), mapped  # torch links CUDA libraries
    dropped = [
        path
        for path in mapped
        if any(fnmatch.fnmatchcase(path, p) for p in images.TRAINER_CUDA_ONLY_FILES)
    ]
    assert dropped == []


# --- images in containerd ------------------------------------------------------------------------


def test_pause_image_runs_until_sigterm(
    containerd: Containerd, store: images.Store, tmp_path: Path
) -> None:
    require_tools("gcc")
    pause = images.build_pause(store)
    assert len(pause.layers) == 1
    archive = images.save([pause], tmp_path / "pause.tar")  # an archive file imports too
    # (The cluster's containerd may hold it already: then the archive adds no new name.)
    images.import_images(containerd.address, [archive])
    assert images.imported_digests(containerd.address)[images.PAUSE] == pause.manifest.digest
    assert images.import_images(containerd.address, [pause]) == [images.PAUSE]
    assert images.imported_digests(containerd.address)[images.PAUSE] == pause.manifest.digest

    process = subprocess.Popen(
        [
            "ctr",
            "--address",
            containerd.address,
            "-n",
            "k8s.io",
            "run",
            "--rm",
            images.PAUSE,
            "pause-test",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while "RUNNING" not in containerd.ctr("tasks", "ls").stdout:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            assert time.monotonic() < deadline, "the pause task never ran"
            time.sleep(0.2)
        time.sleep(1)
        assert process.poll() is None, "pause exited by itself"
        containerd.ctr("tasks", "kill", "--signal", "SIGTERM", "pause-test")
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            containerd.ctr("tasks", "kill", "--signal", "SIGKILL", "pause-test", check=False)
            process.wait(timeout=15)
    assert "pause-test" not in containerd.ctr("containers", "ls").stdout


@pytest.fixture(scope="session")
def base_image(store: images.Store) -> images.Image:
    require_root()
    require_tools("debootstrap", "apt-cache")
    return images.build_base(store)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_trainer_image_imports_the_trainer_stack_as_nonroot(
    containerd: Containerd, store: images.Store, base_image: images.Image
) -> None:
    trainer = images.build_trainer(store, base_image)
    assert trainer.config.user == "65532:65532"
    assert trainer.config.entrypoint == ["python", "-m", "ulmfit_trainer"]
    images.import_images(containerd.address, [trainer])
    check = (
        "import os, sys, torch, deepspeed, transformers, ray.tune, ulmfit_trainer; "
        "print(os.getuid(), os.getgid(), sys.prefix, os.environ['HOME'])"
    )
    result = containerd.run(images.TRAINER, "trainer-imports", "python", "-c", check)
    assert result.stdout.split()[-4:] == ["65532", "65532", "/opt/venv", "/tmp"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_trainer_image_runs_a_pretraining_stage(
    containerd: Containerd, store: images.Store, base_image: images.Image, tmp_path: Path
) -> None:
    """A real stage in the image: DeepSpeed on CPU, no compiler, no triton, a bind-mounted store."""
    import sys

    sys.path.insert(0, str(images.ROOT / "trainer"))
    from ulmfit_trainer.config import (
        ArchitectureSpec,
        DataSpec,
        LMStageSpec,
        ModelSpec,
        StageConfig,
        StageName,
        TokenizerSpec,
    )

    images.import_images(containerd.address, [images.build_trainer(store, base_image)])
    work = tmp_path / "work"
    work.mkdir()
    work.chmod(0o777)  # the image's user writes the store here
    StageConfig(
        stage=StageName("pretrain"),
        run="testing/debian-topics",
        store_root="/work/store",
        data=DataSpec(
            max_length=32, max_train_examples=160, max_unlabeled_examples=300, max_eval_examples=80
        ),
        model=ModelSpec(
            architecture=ArchitectureSpec(layers=2, hidden_size=32, heads=2, context_length=32)
        ),
        tokenizer=TokenizerSpec(vocab_size=600),
        lm=LMStageSpec(epochs=1, learning_rate=3e-3, batch_size=8, checkpoint_every=1000),
    ).write(work / "pretrain.json")
    result = containerd.ctr(
        "run",
        "--rm",
        "--env",
        "OMP_NUM_THREADS=1",
        f"--mount=type=bind,src={work},dst=/work,options=rbind:rw",
        images.TRAINER,
        "trainer-stage",
        "python",
        "-m",
        "ulmfit_trainer",
        "pretrain",
        "--config",
        "/work/pretrain.json",
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "@metrics " in result.stdout
    assert (work / "store" / "testing" / "debian-topics" / "pretrain" / "final").is_dir()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_operator_image_from_the_dockerfile_runs_ulmfit(
    containerd: Containerd, store: images.Store, base_image: images.Image
) -> None:
    require_tools("buildah")
    operator = images.build_operator(store, base_image)
    assert operator.config.user == "65532:65532"
    assert operator.config.entrypoint == ["ulmfit", "operator"]
    images.import_images(containerd.address, [operator])
    result = containerd.run(images.OPERATOR, "operator-help", "ulmfit", "--help")
    assert "operator" in result.stdout and "Usage" in result.stdout
    who = containerd.run(
        images.OPERATOR, "operator-id", "python", "-c", "import os;print(os.getuid())"
    )
    assert who.stdout.strip() == "65532"
    # pip's build secrets reached no layer.
    for layer in operator.layers:
        with tarfile.open(store.path(layer.digest)) as tar:
            assert not [n for n in tar.getnames() if n.endswith(("pip.conf", "pip-ca.crt"))]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_ensure_images_imports_pause_init_trainer_and_operator(containerd: Containerd) -> None:
    require_tools("gcc", "debootstrap", "buildah")
    refs = images.ensure_images(containerd.address)
    assert refs == {
        "pause": images.PAUSE,
        "init": images.INIT,
        "trainer": images.TRAINER,
        "operator": images.OPERATOR,
    }
    listed = containerd.ctr("images", "ls", "--quiet").stdout.split()
    assert set(refs.values()) <= set(listed)


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_dockerfile_trainer_target_builds_on_the_debian_base(
    store: images.Store, base_image: images.Image
) -> None:
    """The real ``trainer`` target, torch from the package index: a long build (see the README).

    The image runs as its numeric user, imports the training stack and loads DeepSpeed's CPU
    shared-memory op built into it (the compiler that built it is purged from the image). The
    image is removed afterwards: several GB that later builds on a small disk need.
    """
    require_tools("buildah")
    buildah = images.buildah()
    try:
        images.buildah_build(
            "trainer",
            images.TRAINER_DOCKERFILE,
            images.trainer_target_args(base_image),
            [base_image],
            timeout=6600,
        )
        container = subprocess.run(
            [*buildah, "from", "--pull-never", images.TRAINER_DOCKERFILE],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        check = "import os, shutil, torch, deepspeed, transformers, ray.tune, ulmfit_trainer; "
        check += "import deepspeed.ops.comm.deepspeed_shm_comm_op; "
        check += "print(shutil.which('g++'), os.getuid())"
        try:
            result = subprocess.run(
                [*buildah, "run", "--isolation", "chroot", container, "--", "python", "-c", check],
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
        finally:
            subprocess.run([*buildah, "rm", container], capture_output=True, check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.split()[-2:] == ["None", "65532"], result.stdout
    finally:
        images.forget_buildah_image(images.TRAINER_DOCKERFILE)
