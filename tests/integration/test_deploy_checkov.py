"""checkov on everything that gets deployed: no failed check, every skip with a written reason.

Objects are scanned as they reach a cluster: the kustomization built, the namespaced Role and the
examples placed in a namespace (as `kubectl apply -n NS` does), and the chart rendered by the real
helm for every documented setup into its release namespace. The Dockerfile is scanned as is.
Skips live on the objects they concern (`checkov.io/skipN: CKV_...=reason` annotations,
`# checkov:skip=CKV_...:reason` comments); none is global.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness import parts
from tests.harness.tools import Tool

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "ulmfit-operator"
MANIFESTS = ROOT / "manifests"
TARGET_NAMESPACE = "ml-team"  # where namespace-less files are applied with `-n`


def checkov_path() -> Path | None:
    beside = Path(sys.executable).parent / "checkov"
    if beside.is_file():
        return beside
    found = shutil.which("checkov")
    return Path(found) if found else None


def _with_namespace(path: Path, namespace: str) -> str:
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for doc in documents:
        doc.setdefault("metadata", {}).setdefault("namespace", namespace)
    return yaml.safe_dump_all(documents, sort_keys=False)


@pytest.fixture(scope="module")
def scanned(tmp_path_factory: pytest.TempPathFactory, helm: Tool, kubectl: Tool) -> dict[str, Any]:
    checkov = checkov_path()
    parts.require(checkov is not None, "checkov", "install checkov (pip)")
    assert checkov is not None
    tree = tmp_path_factory.mktemp("checkov")
    (tree / "manifests").mkdir()
    (tree / "manifests" / "kustomization.yaml.rendered.yaml").write_text(
        kubectl.run("kustomize", str(MANIFESTS)).stdout
    )
    for left_out in ("rbac/role_namespaced.yaml", "operator/s3-credentials-secret.example.yaml"):
        target = tree / "manifests" / left_out.replace("/", "__")
        target.write_text(_with_namespace(MANIFESTS / left_out, TARGET_NAMESPACE))
    (tree / "examples").mkdir()
    for example in sorted((ROOT / "examples").glob("*.yaml")):
        (tree / "examples" / example.name).write_text(_with_namespace(example, TARGET_NAMESPACE))
    (tree / "chart").mkdir()
    for setup in sorted(CHART.glob("ci/*-values.yaml")):
        args = ["--values", str(setup)]
        if (yaml.safe_load(setup.read_text()) or {}).get("rbac", {}).get("scope") == "namespace":
            args += ["--set", f"watchNamespaces={{{TARGET_NAMESPACE}}}"]
        # One release namespace per setup: graph checks (a NetworkPolicy for each pod) must not
        # credit one setup with another's objects.
        name = setup.stem.removesuffix("-values")
        rendered = helm.run(
            "template", name, str(CHART), "--namespace", f"ulmfit-{name}", *args
        ).stdout
        (tree / "chart" / f"{setup.stem}.yaml").write_text(rendered)
    shutil.copy(ROOT / "Dockerfile", tree / "Dockerfile")
    result = subprocess.run(
        [
            str(checkov),
            "--directory",
            str(tree),
            "--framework",
            "kubernetes",
            "dockerfile",
            "--output",
            "json",
            "--skip-download",
            "--compact",
        ],
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
        cwd=tree,  # no .checkov.yaml of any checkout applies: every check runs
        env={
            "PATH": "/usr/bin:/bin",
            "HOME": str(tree),
            "LOG_LEVEL": "ERROR",
        },
    )
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    return {r["check_type"]: r for r in reports}


def test_checkov_scanned_every_kind_of_file(scanned: dict[str, Any]) -> None:
    assert {"kubernetes", "dockerfile"} <= scanned.keys()
    files = {
        check["file_path"].split("/")[1]
        for report in scanned.values()
        for check in report["results"]["passed_checks"]
    }
    assert {"manifests", "examples", "chart", "Dockerfile"} <= files


def test_no_failed_checks(scanned: dict[str, Any]) -> None:
    failed = [
        f"{check['check_id']} {check['check_name']}: {check['resource']} ({check['file_path']})"
        for report in scanned.values()
        for check in report["results"]["failed_checks"]
    ]
    assert failed == []


def test_every_skip_has_a_reason(scanned: dict[str, Any]) -> None:
    skipped = [
        check for report in scanned.values() for check in report["results"]["skipped_checks"]
    ]
    assert skipped, "the skips documented in the manifests were not seen"
    for check in skipped:
        reason = (check.get("check_result") or {}).get("suppress_comment") or ""
        assert len(reason.split()) >= 5, f"{check['check_id']} on {check['resource']}: {reason!r}"
