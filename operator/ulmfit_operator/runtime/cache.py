"""`View`: what the operator knows of the cluster — jobs, their children, their last state.

Fed by the watches (kopf's event handlers, and a list of the children at start-up), read by the
workers; no I/O. `Key` is a job's (namespace, name).
"""

from __future__ import annotations

import threading
from typing import Any

from ulmfit_operator.children import Child

Key = tuple[str, str]
"""(namespace, name) of a ULMFiTJob."""


class View:
    """What the operator knows of the cluster: jobs and their children, fed by watches."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[Key, dict[str, Any]] = {}
        self._children: dict[Key, dict[str, Child]] = {}
        self._states: dict[Key, str] = {}

    def put_job(self, body: dict[str, Any]) -> Key:
        meta = body["metadata"]
        meta.pop("managedFields", None)  # large, and nothing here reads it
        key = (meta["namespace"], meta["name"])
        with self._lock:
            self._jobs[key] = body
        return key

    def drop_job(self, key: Key) -> None:
        with self._lock:
            self._jobs.pop(key, None)
            self._states.pop(key, None)

    def job(self, key: Key) -> dict[str, Any] | None:
        with self._lock:
            return self._jobs.get(key)

    def job_keys(self) -> list[Key]:
        with self._lock:
            return list(self._jobs)

    def put_child(self, child: Child) -> tuple[Key, bool]:
        """Remember a child; also says whether anything reconcile looks at changed."""
        key = (child.namespace, child.job)
        with self._lock:
            children = self._children.setdefault(key, {})
            before = children.get(child.name)
            children[child.name] = child
        changed = before is None or _relevant(before) != _relevant(child)
        return key, changed

    def drop_child(self, namespace: str, job: str, name: str) -> Key:
        key = (namespace, job)
        with self._lock:
            children = self._children.get(key, {})
            children.pop(name, None)
            if not children:
                self._children.pop(key, None)
        return key

    def children(self, key: Key) -> list[Child]:
        with self._lock:
            return list(self._children.get(key, {}).values())

    def set_state(self, key: Key, state: str) -> None:
        with self._lock:
            if key in self._jobs:
                self._states[key] = state

    def state(self, key: Key) -> str | None:
        with self._lock:
            return self._states.get(key)

    def counts(self) -> dict[str, int]:
        with self._lock:
            counts: dict[str, int] = {}
            for key in self._jobs:
                state = self._states.get(key, "Pending")
                counts[state] = counts.get(state, 0) + 1
            return counts


def _relevant(child: Child) -> tuple[Any, ...]:
    return (
        child.phase,
        child.message,
        child.deleting,
        child.stopped,
        child.started,
        child.resumed,
        child.owner_uid,
    )
