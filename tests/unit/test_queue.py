"""The work queue: a key once however often added, one worker per key, event lane first."""

from __future__ import annotations

import threading
import time

import pytest
from ulmfit_operator.runtime.queue import WorkQueue

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def queue() -> WorkQueue:
    made = WorkQueue()
    yield made
    made.close()


def drain(queue: WorkQueue) -> list[tuple[str, str]]:
    keys = []
    while len(queue):
        key = queue.get()
        assert key is not None
        keys.append(key)
        queue.done(key)
    return keys


def test_operator_queue_hands_out_a_key_once_however_often_added(queue: WorkQueue) -> None:
    for _ in range(3):
        queue.add(("ns", "a"))
        queue.add(("ns", "b"), resync=True)
    assert len(queue) == 2
    assert drain(queue) == [("ns", "a"), ("ns", "b")]


def test_operator_queue_event_keys_go_before_resync_keys(queue: WorkQueue) -> None:
    for name in ("old-1", "old-2", "old-3"):
        queue.add(("ns", name), resync=True)
    queue.add(("ns", "new-1"))
    queue.add(("ns", "new-2"))
    queue.add(("ns", "old-3"))  # an event for a job waiting in the resync lane: moves up
    assert drain(queue) == [
        ("ns", "new-1"),
        ("ns", "new-2"),
        ("ns", "old-3"),
        ("ns", "old-1"),
        ("ns", "old-2"),
    ]


def test_operator_queue_key_added_while_processed_comes_back_after(queue: WorkQueue) -> None:
    queue.add(("ns", "a"))
    key = queue.get()
    assert key == ("ns", "a")
    queue.add(("ns", "a"), resync=True)
    queue.add(("ns", "a"))  # moved to the event lane while still being processed
    queue.add(("ns", "b"), resync=True)
    assert len(queue) == 1  # waiting: "b" ("a" waits for its worker to be done)
    queue.add(("ns", "c"))
    assert queue.get() == ("ns", "c")  # "a" is still with its worker
    queue.done(("ns", "c"))
    queue.done(key)
    assert drain(queue) == [("ns", "a"), ("ns", "b")]
    assert len(queue) == 0


def test_operator_queue_resync_key_again_after_it_was_handed_out(queue: WorkQueue) -> None:
    queue.add(("ns", "a"), resync=True)
    queue.add(("ns", "a"))  # leaves a stale entry in the resync lane
    assert queue.get() == ("ns", "a")
    queue.add(("ns", "a"), resync=True)  # while processed: waits for done
    assert len(queue) == 0
    queue.done(("ns", "a"))
    assert len(queue) == 1
    assert drain(queue) == [("ns", "a")]


def test_operator_queue_close_wakes_workers(queue: WorkQueue) -> None:
    queue.close()
    assert queue.get() is None


def test_operator_queue_wakes_a_waiting_worker_for_a_delayed_key(queue: WorkQueue) -> None:
    """Workers and the timer wait on one condition: each add must wake them all."""
    got: list[tuple[str, str] | None] = []
    workers = [threading.Thread(target=lambda: got.append(queue.get())) for _ in range(3)]
    for worker in workers:
        worker.start()
    time.sleep(0.1)  # the workers and the timer are all waiting
    for name in ("a", "b", "c"):
        queue.add_after(("ns", name), 0.05)
    for worker in workers:
        worker.join(5)
    assert sorted(k for k in got if k is not None) == [("ns", "a"), ("ns", "b"), ("ns", "c")]
