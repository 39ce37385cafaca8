"""Reproducible set-up: requirements.lock pins pyproject.toml's requirements, `make env`
(scripts/bootstrap.sh) installs by it, and DeepSpeed's CPU shared-memory op is built at set-up.

The Dockerfile's side (its install script passes the lock to pip, the trainer image builds the
op) is tested in tests/integration/test_deploy_dockerfile.py.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.version import Version

from tests.harness.parts import require
from tests.harness.tools import shellcheck

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.lock"
BOOTSTRAP = ROOT / "scripts" / "bootstrap.sh"
VENV = ROOT / ".venv"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins() -> dict[str, list[tuple[str, Marker | None]]]:
    """{distribution: [(version, marker or None)]}: a universal lock may pin a name per Python."""
    pins: dict[str, list[tuple[str, Marker | None]]] = {}
    for line in LOCK.read_text().splitlines():
        code = line.split("#", 1)[0].strip()
        if not code:
            continue
        requirement = Requirement(code)
        (spec,) = requirement.specifier  # one clause: an exact pin
        assert spec.operator == "==" and "*" not in spec.version, f"not an exact pin: {line}"
        pins.setdefault(canonical(requirement.name), []).append((spec.version, requirement.marker))
    return pins


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def project_requirements() -> list[Requirement]:
    """The core requirements, every extra's and the build requirements."""
    data = pyproject()
    lines = list(data["project"]["dependencies"])
    for extra in data["project"]["optional-dependencies"].values():
        lines += extra
    lines += data["build-system"]["requires"]
    return [Requirement(line) for line in lines]


# ----------------------------------------------------------------------------------- the lock


def test_lock_is_exact_pins_without_any_index() -> None:
    text = LOCK.read_text()
    assert lock_pins(), "requirements.lock pins nothing"
    for line in text.splitlines():
        assert not line.startswith("-"), f"options (index URLs) stay out of the lock: {line}"
        assert "://" not in line.split("#", 1)[0], f"a URL in the lock: {line}"
    assert "make lock" in text.splitlines()[1], "the header names the command that remakes it"


def test_lock_pins_every_requirement_within_its_specifier() -> None:
    """Editing a requirement in pyproject.toml without `make lock` fails here."""
    pins = lock_pins()
    problems = []
    for requirement in project_requirements():
        found = pins.get(canonical(requirement.name))
        if not found:
            problems.append(f"{requirement}: not in requirements.lock")
            continue
        for version, _ in found:
            if not requirement.specifier.contains(Version(version), prereleases=True):
                problems.append(f"{requirement}: the lock pins {version}")
    assert not problems, "run `make lock`:\n" + "\n".join(problems)


def test_make_lock_resolves_every_extra_for_every_python(tmp_path: Path) -> None:
    """`make lock` resolves every extra, universally from Python 3.11 up: the dev venv's 3.11
    and the trainer image's 3.12 install from the one lock."""
    result = run_bootstrap_with_stand_ins(tmp_path, "lock")
    assert result.done.returncode == 0, result.done.stdout + result.done.stderr
    compile_call = next(call for call in result.calls if call[:2] == ["pip", "compile"])
    extras = {word.split("=", 1)[1] for word in compile_call if word.startswith("--extra=")}
    assert extras == set(pyproject()["project"]["optional-dependencies"])
    assert "--universal" in compile_call
    assert compile_call[compile_call.index("--python-version") + 1] == "3.11"
    assert compile_call[compile_call.index("-o") + 1] == "requirements.lock"
    build = pyproject()["build-system"]["requires"]
    assert result.compile_input == [*build, "uv"], "build requirements and uv are locked too"


# ------------------------------------------------------------------------ bootstrap.sh, behaviour


class Run:
    def __init__(self, done: subprocess.CompletedProcess[str], log: Path, stdin: Path) -> None:
        self.done = done
        lines = log.read_text().splitlines() if log.exists() else []
        self.calls = [line.split("\t") for line in lines]
        self.compile_input = stdin.read_text().splitlines() if stdin.exists() else []


STAND_IN_UV = """\
#!{python}
# uv for bootstrap.sh's tests: logs each call (and the build variables DeepSpeed reads); an
# install of DeepSpeed with DS_BUILD_SHM_COMM=1 "builds" it, with the op, into the fake site.
import os, pathlib, sys
here = pathlib.Path(__file__).resolve().parents[2]
args = sys.argv[1:]
if args == ["--version"]:
    print("uv {uv} (stand-in)")
    sys.exit(0)
build = [f"{{k}}={{os.environ[k]}}" for k in ("DS_BUILD_OPS", "DS_BUILD_SHM_COMM", "DS_ACCELERATOR")
         if k in os.environ]
with open(here / "calls.log", "a") as log:
    log.write("\\t".join(args + build) + "\\n")
if args[:2] == ["pip", "compile"]:
    (here / "compile-input").write_text(sys.stdin.read())
wheels = [a for a in args if pathlib.Path(a).name.startswith("deepspeed-") and a.endswith(".whl")]
if wheels and "DS_BUILD_SHM_COMM=1" in pathlib.Path(wheels[0]).read_text():
    (here / "site" / "deepspeed" / "git_version_info_installed.py").write_text(
        "installed_ops={{'deepspeed_shm_comm': 1}}\\naccelerator_name='cpu'\\n"
        "torch_info={{'version': '{torch_minor}'}}\\n")
"""

STAND_IN_PYTHON = """\
#!/bin/sh
# The venv's python for bootstrap.sh's tests: `-m pip` is logged with the build variables
# DeepSpeed reads, and `-m pip wheel ... --wheel-dir DIR` "builds" a wheel there that records
# them; anything else runs the real interpreter over the fake site (the DeepSpeed and torch that
# bootstrap.sh inspects).
here=$(cd "$(dirname "$0")/../.." && pwd)
if [ "$1" = -m ] && [ "$2" = pip ]; then
  build="DS_BUILD_OPS=${{DS_BUILD_OPS-}} DS_BUILD_SHM_COMM=${{DS_BUILD_SHM_COMM-}}"
  build="$build DS_ACCELERATOR=${{DS_ACCELERATOR-}}"
  printf 'python\\t%s\\t%s\\n' "$*" "$build" >> "$here/calls.log"
  if [ "$3" = wheel ]; then
    while [ $# -gt 0 ] && [ "$1" != --wheel-dir ]; do shift; done
    echo "$build" > "$2/deepspeed-0-cp311-cp311-linux_x86_64.whl"
  fi
  exit 0
fi
PYTHONPATH="$here/site" exec {python} "$@"
"""


def fake_site(site: Path, deepspeed: str, torch: str) -> None:
    """A DeepSpeed (installed without the op) and a torch, as metadata and a build record."""
    for name, version in (("deepspeed", deepspeed), ("torch", torch)):
        info = site / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        info.joinpath("METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        )
    (site / "deepspeed").mkdir()
    (site / "deepspeed" / "git_version_info_installed.py").write_text(
        "installed_ops={'deepspeed_shm_comm': False}\naccelerator_name='cpu'\n"
        f"torch_info={{'version': '{'.'.join(torch.split('.')[:2])}'}}\n"
    )


def run_bootstrap_with_stand_ins(
    tmp: Path, *args: str, lock: bool = True, clone: str = "repo"
) -> Run:
    """bootstrap.sh in a copy of the repository whose .venv holds stand-ins for python and uv.

    ``clone`` names the copy: another name is a fresh clone on the same machine (same cache)."""
    work = Path(tmp) / clone
    if not work.exists():
        (work / "scripts").mkdir(parents=True)
        shutil.copy(BOOTSTRAP, work / "scripts")
        shutil.copy(ROOT / "pyproject.toml", work)
        pins = lock_pins()
        deepspeed, torch = pins["deepspeed"][0][0], pins["torch"][0][0]
        fake_site(work / "site", deepspeed, torch)
        bin_dir = work / ".venv" / "bin"
        bin_dir.mkdir(parents=True)
        uv = STAND_IN_UV.format(
            python=sys.executable,
            uv=pins["uv"][0][0],
            torch_minor=".".join(torch.split(".")[:2]),
        )
        for name, text in (("uv", uv), ("python", STAND_IN_PYTHON.format(python=sys.executable))):
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)
    if lock:
        shutil.copy(LOCK, work)
    else:
        (work / "requirements.lock").unlink(missing_ok=True)
    log, stdin = work / "calls.log", work / "compile-input"
    log.unlink(missing_ok=True)
    done = subprocess.run(
        ["bash", str(work / "scripts" / "bootstrap.sh"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp)},
    )
    return Run(done, log, stdin)


def test_bootstrap_installs_everything_with_the_lock_and_builds_the_op_once(
    tmp_path: Path,
) -> None:
    first = run_bootstrap_with_stand_ins(tmp_path)
    assert first.done.returncode == 0, first.done.stdout + first.done.stderr
    installs = [call for call in first.calls if call[:2] == ["pip", "install"]]
    assert installs, first.calls
    for call in installs:
        pairs = set(itertools.pairwise(call))
        assert ("--constraints", "requirements.lock") in pairs, call
        assert ("--build-constraints", "requirements.lock") in pairs, call
    (built,) = [call for call in first.calls if call[0] == "python"]  # uv is the locked one
    command = built[1].split()
    assert command[:3] == ["-m", "pip", "wheel"], built
    pinned = f"deepspeed=={lock_pins()['deepspeed'][0][0]}"
    assert {"--no-deps", "--no-build-isolation", pinned} <= set(command), built
    assert built[2].split() == ["DS_BUILD_OPS=0", "DS_BUILD_SHM_COMM=1", "DS_ACCELERATOR=cpu"]
    (deepspeed,) = [call for call in installs if any("deepspeed" in arg for arg in call)]
    assert "--reinstall-package" in deepspeed
    [wheel] = [Path(arg) for arg in deepspeed if arg.endswith(".whl")]
    assert wheel.is_relative_to(tmp_path / ".cache" / "ulmfit-operator" / "wheels"), wheel
    # The wheel's cache key names every input of the build: DeepSpeed, torch and Python.
    pins, python = lock_pins(), f"cp{sys.version_info[0]}{sys.version_info[1]}"
    key = f"deepspeed-{pins['deepspeed'][0][0]}-torch{pins['torch'][0][0]}-{python}-cpu-shm"
    assert wheel.parent.name == key, wheel
    assert first.calls.index(built) < first.calls.index(deepspeed)
    assert installs.index(deepspeed) == 1, "torch (what DeepSpeed builds against) goes first"
    assert "torch" in installs[0]
    assert "-e" in installs[-1] and ".[operator,trainer,test]" in installs[-1]

    again = run_bootstrap_with_stand_ins(tmp_path)
    assert again.done.returncode == 0, again.done.stderr
    assert not [call for call in again.calls if "deepspeed" in str(call)], "built once, not again"

    # A fresh clone on the same machine installs the cached wheel: the same bytes, no build.
    clone = run_bootstrap_with_stand_ins(tmp_path, clone="clone")
    assert clone.done.returncode == 0, clone.done.stderr
    assert not [call for call in clone.calls if call[0] == "python"], "no second build"
    assert [call for call in clone.calls if str(wheel) in call], clone.calls


def test_bootstrap_rebuilds_deepspeed_for_another_torch_and_stops_without_a_lock(
    tmp_path: Path,
) -> None:
    run_bootstrap_with_stand_ins(tmp_path)
    record = tmp_path / "repo" / "site" / "deepspeed" / "git_version_info_installed.py"
    text = record.read_text()
    record.write_text(text.replace("torch_info={'version': '", "torch_info={'version': '0"))
    rebuilt = run_bootstrap_with_stand_ins(tmp_path)
    assert rebuilt.done.returncode == 0, rebuilt.done.stderr
    assert [call for call in rebuilt.calls if "deepspeed" in str(call)], "an op for another torch"

    missing = run_bootstrap_with_stand_ins(tmp_path, lock=False)
    assert missing.done.returncode != 0 and "make lock" in missing.done.stderr
    assert not [call for call in missing.calls if call[:2] == ["pip", "install"]]


def test_bootstrap_is_a_script_shellcheck_accepts() -> None:
    result = shellcheck(BOOTSTRAP)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------- the real .venv


def venv_site() -> Path:
    found = sorted(VENV.glob("lib/python3.*/site-packages"))
    require(len(found) == 1, f"{VENV}", "make env")
    return found[0]


def venv_environment() -> dict[str, str]:
    """Marker variables for the venv's Python (from pyvenv.cfg), for the lock's markers."""
    text = (VENV / "pyvenv.cfg").read_text()
    match = re.search(r"^version(?:_info)?\s*=\s*(\d+\.\d+\.\d+)", text, re.MULTILINE)
    assert match, text
    full = match.group(1)
    return {"python_full_version": full, "python_version": ".".join(full.split(".")[:2])}


def test_the_venv_is_installed_from_the_lock() -> None:
    """What `make env` installed is what the lock pins: each of pyproject's requirements, and
    every other installed distribution the lock names."""
    site = venv_site()
    environment = venv_environment()
    installed = {
        canonical(dist.metadata["Name"]): dist.version
        for dist in metadata.distributions(path=[str(site)])
    }
    pins = lock_pins()

    def wanted(name: str) -> set[str]:
        return {
            version
            for version, marker in pins.get(name, [])
            if marker is None or marker.evaluate(environment)
        }

    problems = []
    for requirement in project_requirements():
        name = canonical(requirement.name)
        if installed.get(name) not in wanted(name):
            problems.append(f"{name} {installed.get(name)}, the lock: {sorted(wanted(name))}")
    for name, version in sorted(installed.items()):
        if name in pins and version not in wanted(name):
            problems.append(f"{name} {version}, the lock: {sorted(wanted(name))}")
    assert not problems, "run `make env`:\n" + "\n".join(problems)


def test_the_shm_op_loads_after_set_up_without_a_compiler(tmp_path: Path) -> None:
    """DeepSpeed's CPU shared-memory op was built by `make env`: a fresh process with no C++
    compiler, no ninja and an empty extensions cache loads it, and the trainer's `auto` policy
    uses it. (Without the prebuilt op, loading it compiles for about a minute, or fails.)"""
    python = VENV / "bin" / "python"
    require(python.exists(), f"{python}", "make env")
    empty = tmp_path / "bin"
    empty.mkdir()
    code = textwrap.dedent(
        """
        import shutil
        assert shutil.which("c++") is None and shutil.which("ninja") is None
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
        from ulmfit_trainer import engine
        assert engine._shm_op_built(), "the auto policy would not use the op"
        op = ShareMemCommBuilder().load(verbose=False)
        print(op.__file__)
        """
    )
    env = {
        "PATH": str(empty),
        "HOME": str(tmp_path),
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions"),
        "DS_ACCELERATOR": "cpu",
        "PYTHONPATH": str(ROOT / "trainer"),
    }
    done = subprocess.run(
        [str(python), "-c", code], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    loaded = Path(done.stdout.splitlines()[-1])
    assert loaded.is_relative_to(venv_site() / "deepspeed"), loaded
    assert not (tmp_path / "torch_extensions").exists(), "nothing was JIT-built"


@pytest.mark.parametrize(
    ("record", "tools", "expected"),
    [
        ({"installed_ops": {"deepspeed_shm_comm": 1}, "accelerator_name": "cpu"}, False, True),
        ({"installed_ops": {"deepspeed_shm_comm": 1}, "accelerator_name": "cuda"}, True, False),
        ({"installed_ops": {}, "accelerator_name": "cpu"}, False, False),  # JIT cache only
        ({"installed_ops": {}, "accelerator_name": "cpu"}, True, True),
    ],
)
def test_shm_op_counts_as_built_only_where_it_loads_without_compiling(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, record: dict, tools: bool, expected: bool
) -> None:
    """Prebuilt for the CPU accelerator and this torch: built. A JIT cache needs ninja and a
    compiler to load (ninja recompiles what looks stale): without them, not built."""
    try:
        import deepspeed.git_version_info as info
        import torch
    except ImportError:
        require(False, "deepspeed", "make env")
        raise
    from ulmfit_trainer import engine

    minor = ".".join(torch.__version__.split(".")[:2])
    monkeypatch.setattr(info, "installed_ops", record["installed_ops"])
    monkeypatch.setattr(info, "accelerator_name", record["accelerator_name"])
    monkeypatch.setattr(info, "torch_info", {"version": minor})
    monkeypatch.setattr(engine.shutil, "which", lambda name: f"/bin/{name}" if tools else None)
    cache = tmp_path / "deepspeed_shm_comm"
    cache.mkdir()
    (cache / "deepspeed_shm_comm.so").write_bytes(b"")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert engine._shm_op_built() is expected
    monkeypatch.setattr(info, "torch_info", {"version": "0.0"})
    if record["installed_ops"]:
        assert engine._shm_op_built() is False, "an op built for another torch"
