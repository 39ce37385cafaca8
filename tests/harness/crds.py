"""The real CRDs of the controllers our children run under, from those projects' own module trees.

`tests/cluster/controllers/build.sh` copies them next to the binaries it builds (cached by
version): the Kubeflow Training Operator's PyTorchJob CRD and KubeRay's ray.io CRDs. Tests that
run only an API server install these, so a PyTorchJob or RayJob the operator writes is checked
against the real schema even where no controller runs.
"""

from __future__ import annotations

import functools
from pathlib import Path

from tests.harness import parts


@functools.cache
def _dirs() -> dict[str, Path]:
    from tests.cluster.node import controller_dirs

    try:
        return controller_dirs()
    except RuntimeError as error:
        parts.require(False, "the Kubeflow/KubeRay CRDs", f"`make cluster-build` ({error})")
        raise


def pytorchjob_crd() -> Path:
    return _dirs()["training-operator"] / "crds" / "kubeflow.org_pytorchjobs.yaml"


def ray_crds() -> list[Path]:
    """RayJob and the RayCluster CRD it embeds."""
    crds = _dirs()["kuberay"] / "crds"
    return [crds / "ray.io_rayjobs.yaml", crds / "ray.io_rayclusters.yaml"]
