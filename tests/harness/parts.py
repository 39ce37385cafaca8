"""One policy for a test whose real part is missing: skip with a reason locally, fail in CI."""

from __future__ import annotations

import importlib.util
import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require(available: bool, what: str, how: str) -> None:
    """Stop the calling test when a real part is missing.

    Under ``CI=true`` a missing part is a failure (CI must have installed it); elsewhere the test
    skips with one line naming the part and how to get it.
    """
    if available:
        return
    message = f"{what} is not available: {how}"
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def require_modules(*names: str) -> None:
    """`require` for Python modules; may be called at module level (skips the whole module)."""
    missing = [name for name in names if not _importable(name)]
    if not missing:
        return
    message = (
        f"{', '.join(missing)} not installed: run `make env` "
        "(pip install -e '.[operator,trainer,test]')"
    )
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message, allow_module_level=True)


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package of a dotted name is missing
        return False
