"""DeepSpeed's CPU shared-memory op is not compiled unless asked for (real modules, no build)."""

from __future__ import annotations

import pytest

from tests.harness.parts import require


def test_shm_op_build_is_disabled_in_deepspeeds_own_module(monkeypatch: pytest.MonkeyPatch):
    """With the policy `off`, DeepSpeed's `deepspeed.comm.torch.build_shm_op` is replaced: an
    image without a C++ compiler then starts a CPU stage instead of failing on `c++: not found`.
    (The patch once landed on plain `torch`, which `deepspeed.comm` also calls `torch`.)"""
    try:
        import importlib

        ds_torch = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        require(False, "deepspeed", "make env")
        raise
    from ulmfit_trainer import engine

    original = ds_torch.build_shm_op
    monkeypatch.setattr(ds_torch, "build_shm_op", original)
    monkeypatch.setenv(engine.SHM_POLICY_ENV, "off")
    engine._limit_shm_comm()
    assert ds_torch.build_shm_op is not original
    assert ds_torch.build_shm_op() is None
