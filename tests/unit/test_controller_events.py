"""Watch events around the controller's own status patches: its own write's event queues no
second reconcile, whether it comes before or after the patch's answer; anyone else's does."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import pytest
from ulmfit_operator.children import ChildRef

from tests.unit.test_controller import KEY, Rig

pytestmark = pytest.mark.timeout(60)


class EchoingRig(Rig):
    """The watch event of each status patch arrives while the patch is still in flight (and,
    with `other`, an event of someone else's change too)."""

    def __init__(self, other: bool = False) -> None:
        super().__init__()
        patch_status = self.kube.merge_patch

        def merge_patch(
            ref: ChildRef, patch: Mapping[str, Any], sub: str | None = None
        ) -> dict[str, Any]:
            updated = patch_status(ref, patch, sub)
            self.controller.job_event("MODIFIED", copy.deepcopy(updated))
            if other:
                changed = copy.deepcopy(updated)
                changed["metadata"]["resourceVersion"] += "0"
                self.controller.job_event("MODIFIED", changed)
            return updated

        self.kube.merge_patch = merge_patch  # type: ignore[method-assign]


@pytest.mark.parametrize("other", [False, True], ids=["own", "own-and-other"])
def test_operator_own_status_event_during_the_patch_queues_nothing(other: bool) -> None:
    rig = EchoingRig(other)
    try:
        rig.process()
        assert rig.kube.children() == ["topics-finetune-a1"]
        assert len(rig.kube.status_patches) == 1
        assert len(rig.controller.queue) == (1 if other else 0)
        # The event after the answer (the usual order) is ours too: nothing queued for it.
        if not other:
            rig.controller.job_event("MODIFIED", copy.deepcopy(rig.kube.job))
            assert len(rig.controller.queue) == 0
            changed = copy.deepcopy(rig.kube.job)
            changed["metadata"]["resourceVersion"] = "999"
            rig.controller.job_event("MODIFIED", changed)
            assert len(rig.controller.queue) == 1
        assert not rig.controller._patching
        assert rig.controller.queue.get() == KEY
    finally:
        rig.close()
