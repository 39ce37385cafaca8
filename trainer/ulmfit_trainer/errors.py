"""The project's error hierarchy, shared by the trainer and the operator (no heavy imports).

Kopf's split guides it: a `PermanentError` will not get better by retrying (a bad spec, a corrupt
checkpoint with nothing to fall back to); a `TemporaryError` may (an API server or S3 hiccup).
"""

from __future__ import annotations


class UlmfitError(Exception):
    """Base of every error this project raises on purpose."""


class PermanentError(UlmfitError):
    """Retrying will not help; a person must change something."""


class TemporaryError(UlmfitError):
    """Retrying later may succeed."""


class InvalidSpec(PermanentError):
    """A job spec or stage config that cannot run; names the field and the offending value."""

    def __init__(self, problems: list[tuple[str, object, str]]):
        self.problems = problems
        super().__init__("; ".join(_describe(*problem) for problem in problems))


def _describe(field: str, value: object, message: str) -> str:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"{field}: {message} (got {shown})" if field else f"{message} (got {shown})"
