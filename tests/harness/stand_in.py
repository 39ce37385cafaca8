"""A `python` for the local runner that runs a test's stand-in script instead of the trainer."""

from __future__ import annotations

import sys
from pathlib import Path


def stand_in_python(directory: Path, source: str) -> Path:
    """An executable `directory/python` that runs `source` (saved beside it) with this
    interpreter and whatever arguments the runner passes (`-m ulmfit_trainer <stage> ...`)."""
    script = directory / "stand_in.py"
    script.write_text(source)
    python = directory / "python"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} {script} "$@"\n')
    python.chmod(0o755)
    return python
