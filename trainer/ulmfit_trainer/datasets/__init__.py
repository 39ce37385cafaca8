"""Datasets shipped inside the trainer package, addressed as ``builtin://NAME``.

Each one is a folder of package data next to this file holding ``train``/``valid``/``test``/
``unlabeled`` ``.jsonl.gz`` splits, ``labels.json`` and a ``README.md`` (provenance, license,
counts). A name uses dashes where the folder uses underscores: ``debian-packages`` is
``debian_packages/``. Imports nothing heavy.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["builtin_dataset_dir", "builtin_dataset_names"]

_ROOT = Path(__file__).resolve().parent


def builtin_dataset_names() -> list[str]:
    """Names of the shipped datasets, sorted (``debian-packages``, ...)."""
    return sorted(
        p.name.replace("_", "-")
        for p in _ROOT.iterdir()
        if p.is_dir() and (p / "labels.json").is_file()
    )


def builtin_dataset_dir(name: str) -> Path:
    """The folder of the shipped dataset ``name`` (``builtin://`` prefix allowed).

    Raises ValueError, listing the known names, when there is no such dataset.
    """
    key = name.removeprefix("builtin://").strip().strip("/")
    known = builtin_dataset_names()
    if key.replace("_", "-") not in known:
        raise ValueError(f"unknown builtin dataset {name!r}; known: {', '.join(known) or '(none)'}")
    return _ROOT / key.replace("-", "_")
