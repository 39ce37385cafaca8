"""The store's errors: one base class, and what a caller may want to tell apart.

`StoreUnavailable` is temporary (retry later), `StoreAuthError` and `CheckpointCorrupt` are
permanent (a person must act); `ObjectNotFound` and `NoCheckpoint` are answers, not failures.
"""

from __future__ import annotations

from ulmfit_trainer.errors import PermanentError, TemporaryError, UlmfitError


class StoreError(UlmfitError):
    """A store operation failed."""


class ObjectNotFound(StoreError):
    """The key does not exist in the store."""


class StoreUnavailable(StoreError, TemporaryError):
    """The store could not be reached (connection errors, 5xx) and every retry is spent."""


class StoreAuthError(StoreError, PermanentError):
    """The store rejected the credentials; retrying will not help."""


class CheckpointCorrupt(StoreError, PermanentError):
    """A committed checkpoint does not match its meta.json and nothing older could be loaded."""


class NoCheckpoint(StoreError):
    """No committed checkpoint exists for the stage (or the requested tag)."""
