"""A thin DeepSpeed wrapper: distributed start-up, the ULMFiT optimizer, checkpoints, progress.

Here live ``Dist`` and ``init_distributed`` (the process group: torchrun's environment, or a lone
process), ``Engine`` (a DeepSpeed engine whose param groups carry discriminative rates driven by
a slanted triangular ``LambdaLR``; its checkpoints are written to the store by every rank itself,
no shared disk between nodes is assumed), ``Progress`` (what rank 0 reports, as a
``records.StageProgress``, to the store and stdout) and small helpers (seeding, scratch
directories, logging).
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

from ulmfit_trainer.config import DeepSpeedSpec, Precision
from ulmfit_trainer.models import LayerGroup
from ulmfit_trainer.progress import report_progress
from ulmfit_trainer.records import StageProgress
from ulmfit_trainer.schedules import stlr
from ulmfit_trainer.store import Checkpoint, CheckpointStore

log = logging.getLogger(__name__)

SHM_POLICY_ENV = "ULMFIT_DS_SHM_COMM"


# --------------------------------------------------------------------------- process group


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch_dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, on every rank (small picklable objects only)."""
        if self.world == 1:
            return [value]
        out: list[Any] = [None] * self.world
        torch_dist.all_gather_object(out, value)
        return out

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if self.world == 1:
            return value
        box = [value]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, *values: float) -> list[float]:
        """Element-wise sum of ``values`` over all ranks."""
        tensor = torch.tensor(values, dtype=torch.float64)
        if self.world > 1:
            torch_dist.all_reduce(tensor)
        return tensor.tolist()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _shm_op_built() -> bool:
    """Whether DeepSpeed's shared-memory collective op loads without compiling it.

    Either prebuilt into DeepSpeed (``DS_BUILD_SHM_COMM=1`` at its install, as `make env` and the
    trainer image do) for the CPU accelerator and this torch's minor version, or JIT-built in
    ``TORCH_EXTENSIONS_DIR`` with ninja and a C++ compiler at hand: loading that cache runs ninja,
    which compiles again whatever looks out of date, and fails without them.
    """
    try:
        from deepspeed.git_version_info import accelerator_name, installed_ops, torch_info

        if installed_ops.get("deepspeed_shm_comm"):
            minor = ".".join(torch.__version__.split(".")[:2])
            return accelerator_name == "cpu" and torch_info.get("version") == minor
        if not (shutil.which("ninja") and shutil.which(os.environ.get("CXX", "c++"))):
            return False
        from torch.utils.cpp_extension import _get_build_directory

        build = Path(_get_build_directory("deepspeed_shm_comm", verbose=False))
        return (build / "deepspeed_shm_comm.so").exists()
    except Exception:  # a private torch helper moved: assume a cold cache
        return False


def _limit_shm_comm() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory op at start-up.

    On CPU, DeepSpeed's comm backend compiles ``deepspeed_shm_comm`` on first use: ~50 s in a fresh
    container, every stage, every restart - longer than a small stage trains. The op only speeds
    up intra-node all-reduce; gloo does the same work. Policy (env ``ULMFIT_DS_SHM_COMM``):
    ``auto`` (default) uses it when already built (prebuilt into the image with
    ``DS_BUILD_SHM_COMM=1`` or cached in ``TORCH_EXTENSIONS_DIR``), ``on`` builds it if needed,
    ``off`` never uses it.
    """
    policy = os.environ.get(SHM_POLICY_ENV, "auto").lower()
    if policy == "on" or (policy == "auto" and _shm_op_built()):
        return
    # `import deepspeed.comm.torch as ...` would bind the `torch` attribute that package sets on
    # `deepspeed.comm` (plain torch), and the patch below would miss DeepSpeed's module.
    ds_torch: Any = importlib.import_module("deepspeed.comm.torch")
    ds_torch.build_shm_op = lambda: None


def init_distributed(use_deepspeed: bool = True) -> Dist:
    """Join torchrun's process group (or make a group of one); gloo on CPU, NCCL on GPU.

    Without ``use_deepspeed`` (inference-only stages) DeepSpeed is not even imported.
    """
    solo = "RANK" not in os.environ  # a plain `python -m ulmfit_trainer`: a job of one process
    if solo:
        os.environ.update(
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),  # read by DeepSpeed's checks; nothing binds it
        )
    gpu = torch.cuda.is_available()
    if not gpu:
        # DeepSpeed picks its accelerator at import; without this it probes for CUDA and warns.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if gpu:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:
            # Processes on one node share its cores; oversubscription slows every one of them.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    backend = "nccl" if gpu else "gloo"
    if solo and not torch_dist.is_initialized():
        # A group of one needs no rendezvous. A TCP store on a port picked beforehand could lose
        # it to another process between the pick and the bind; an in-process store cannot.
        torch_dist.init_process_group(
            backend,
            store=torch_dist.HashStore(),
            rank=0,
            world_size=1,
            device_id=device if gpu else None,
        )
    if use_deepspeed:
        import deepspeed

        if not gpu:
            _limit_shm_comm()
        deepspeed.init_distributed(dist_backend=backend, verbose=False)  # adopts a group made above
    elif not torch_dist.is_initialized():
        torch_dist.init_process_group(backend, device_id=device if gpu else None)
    rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    return Dist(rank, world, local_rank, local_world, device)


# --------------------------------------------------------------------------- engine


def deepspeed_config(
    spec: DeepSpeedSpec, micro_batch: int, accumulation: int, world: int, gpu: bool
) -> dict[str, Any]:
    precision = spec.precision
    if precision == Precision.AUTO:
        precision = Precision.BF16 if gpu else Precision.FP32
    zero: dict[str, Any] = {"stage": spec.zero_stage}
    if spec.zero_stage == 3:
        # save_pretrained needs whole tensors; ZeRO-3 only has shards unless asked to gather.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * world,
        "gradient_clipping": spec.gradient_clipping,
        "zero_optimization": zero,
        # Our optimizer is torch's AdamW (DeepSpeed's fused ones are CUDA or JIT-compiled C++).
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == Precision.BF16},
        "fp16": {"enabled": precision == Precision.FP16},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def param_groups(
    groups: list[LayerGroup], peak_lrs: list[float], weight_decay: float
) -> list[dict[str, Any]]:
    """One optimizer group per (layer group, decay or not), trainable parameters only.

    Biases and norm gains get no weight decay (decaying them toward zero only hurts); frozen
    parameters stay out entirely, which is also what keeps ZeRO from partitioning them.
    """
    out = []
    for group, lr in zip(groups, peak_lrs, strict=True):
        trainable = [p for p in group.params.values() if p.requires_grad]
        decay = [p for p in trainable if p.ndim >= 2]
        no_decay = [p for p in trainable if p.ndim < 2]
        for params, wd, suffix in ((decay, weight_decay, ""), (no_decay, 0.0, "/no-decay")):
            if params:
                out.append(
                    {"params": params, "lr": lr, "weight_decay": wd, "name": group.name + suffix}
                )
    if not out:
        raise ValueError("no trainable parameters")
    return out


class Engine:
    """A DeepSpeed engine over ``model`` with discriminative, slanted triangular rates.

    Gradual unfreezing builds one per phase: ZeRO partitions only the parameters that require
    grad when the engine is made, so a phase that unfreezes more needs a fresh engine.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        groups: list[LayerGroup],
        peak_lrs: list[float],
        total_steps: int,
        *,
        dist: Dist,
        spec: DeepSpeedSpec,
        micro_batch: int,
        accumulation: int,
        cut_frac: float,
        lr_ratio: float,
        weight_decay: float,
    ):
        import deepspeed

        self.dist = dist
        self.total_steps = total_steps
        self.accumulation = accumulation
        self.spec = spec
        pgroups = param_groups(groups, peak_lrs, weight_decay)
        # betas (0.9, 0.99): the ULMFiT paper's choice; fused/foreach kernels where torch has them.
        optimizer = torch.optim.AdamW(pgroups, lr=max(peak_lrs), betas=(0.9, 0.99), eps=1e-6)
        schedule = partial(stlr, total_steps=total_steps, cut_frac=cut_frac, ratio=lr_ratio)
        # A scheduler over the plain torch optimizer: ZeRO keeps using these very param_group
        # dicts, and DeepSpeed steps the scheduler at each accumulation boundary.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [schedule] * len(pgroups))
        gpu = dist.device.type == "cuda"
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model.to(dist.device),
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(spec, micro_batch, accumulation, dist.world, gpu),
            dist_init_required=False,
        )
        self.dtype = next(p for p in self.ds.module.parameters()).dtype

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.ds(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> None:
        """Ends one micro batch; the optimizer and the rate schedule move at each boundary."""
        self.ds.step()

    def train(self, mode: bool = True) -> None:
        self.ds.train(mode)

    def lrs(self) -> list[float]:
        return [group["lr"] for group in self.scheduler.optimizer.param_groups]

    def fast_forward(self, step: int) -> None:
        """Put the rate schedule at optimizer step ``step`` (after a resume)."""
        self.scheduler.last_epoch = step
        for group, base, fn in zip(
            self.scheduler.optimizer.param_groups,
            self.scheduler.base_lrs,
            self.scheduler.lr_lambdas,
            strict=True,
        ):
            group["lr"] = base * fn(step)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's weights on rank 0 (a collective under ZeRO-3), None elsewhere."""
        if self.spec.zero_stage == 3:
            state = self.ds._zero3_consolidated_16bit_state_dict()
            return state if self.dist.is_main else None
        return self.ds.module.state_dict() if self.dist.is_main else None

    def close(self) -> None:
        """Release the engine: removes ZeRO's gradient hooks from the (reused) parameters."""
        self.ds.destroy()

    # -- checkpoints (every rank takes part)

    def save(
        self, checkpoints: CheckpointStore, stage: str, tag: str, meta: dict[str, Any]
    ) -> Checkpoint | None:
        """A resumable DeepSpeed checkpoint: each rank writes and uploads its own shard files,
        then rank 0 commits meta.json listing all of them (nodes need not share a disk)."""
        with tempfile.TemporaryDirectory(prefix="ulmfit-ckpt-") as tmp:
            self.ds.save_checkpoint(tmp, tag="state", save_latest=False)
            mine = checkpoints.upload(stage, tag, Path(tmp) / "state")
        everyone = self.dist.gather(mine)
        checkpoint = None
        if self.dist.is_main:
            files = sorted({e for entries in everyone for e in entries}, key=lambda e: e.path)
            meta = {**meta, "worldSize": self.dist.world, "zeroStage": self.spec.zero_stage}
            checkpoint = checkpoints.commit(stage, tag, files, meta)
        self.dist.barrier()
        return checkpoint

    def resume(self, checkpoints: CheckpointStore, stage: str) -> Checkpoint | None:
        """Load the newest committed resumable checkpoint of ``stage``, if any."""
        # Rank 0 picks (and verifies) the checkpoint so that every rank loads the same one even
        # when a corrupt newest one makes the store fall back.
        with tempfile.TemporaryDirectory(prefix="ulmfit-resume-") as tmp:
            chosen = None
            if self.dist.is_main:
                resumable = [c for c in checkpoints.committed(stage) if not c.final]
                if resumable:
                    chosen = checkpoints.load(stage, Path(tmp) / "state").tag
            chosen = self.dist.broadcast(chosen)
            if chosen is None:
                return None
            if not self.dist.is_main:
                checkpoints.load(stage, Path(tmp) / "state", tag=chosen)
            checkpoint = next(c for c in checkpoints.committed(stage) if c.tag == chosen)
            same_world = checkpoint.meta.get("worldSize") == self.dist.world
            if not same_world:
                log.warning(
                    "checkpoint %s was written by %s processes, this run has %d: loading the "
                    "weights only (fresh optimizer state)",
                    checkpoint.tag,
                    checkpoint.meta.get("worldSize"),
                    self.dist.world,
                )
            self.ds.load_checkpoint(
                tmp,
                tag="state",
                load_optimizer_states=same_world,
                load_lr_scheduler_states=same_world,
                load_module_only=not same_world,
            )
        self.fast_forward(checkpoint.step)
        return checkpoint


# --------------------------------------------------------------------------- progress


class Progress:
    """Rank 0 reports every ``interval`` seconds: ``progress.json`` in the store (what the operator
    reads) and one ``@progress {json}`` line on stdout (what the local runner reads)."""

    def __init__(
        self,
        checkpoints: CheckpointStore,
        stage: str,
        dist: Dist,
        interval: float,
        total_steps: int = 0,
        phase: str | None = None,
    ):
        self.checkpoints, self.stage, self.dist, self.interval = checkpoints, stage, dist, interval
        self.total_steps, self.phase = total_steps, phase
        self.step = 0
        self._losses: list[float] = []
        self._tokens = 0
        self._since = time.perf_counter()
        self.last: StageProgress | None = None

    def begin(self, total_steps: int, phase: str | None = None, step: int = 0) -> None:
        self.total_steps, self.phase, self.step = total_steps, phase, step
        self._losses, self._tokens, self._since = [], 0, time.perf_counter()

    def update(self, step: int, loss: float | None, tokens: int) -> None:
        """After each micro batch: ``tokens`` this rank just processed, its loss (if training)."""
        self.step = step
        if loss is not None:
            self._losses.append(loss)
        self._tokens += tokens
        if self.dist.is_main and time.perf_counter() - self._since >= self.interval:
            self.report("running")

    def report(self, state: str, **extra: Any) -> None:
        """Report ``state`` with the rates since the last report; ``extra`` sets other
        ``StageProgress`` fields (``metrics=...``, ``step=...``)."""
        if not self.dist.is_main:
            return
        now = time.perf_counter()
        elapsed = max(now - self._since, 1e-9)
        loss = None
        if self._losses:
            loss = round(sum(self._losses) / len(self._losses), 5)
        elif self.last is not None:
            loss = self.last.loss
        fields: dict[str, Any] = {
            "stage": self.stage,
            "phase": self.phase,
            "step": self.step,
            "total_steps": self.total_steps,
            "state": state,
            "loss": loss,
            # Every rank processes a like share, so rank 0's count times the world size.
            "tokens_per_second": round(self._tokens * self.dist.world / elapsed, 1),
            **extra,
        }
        self.last = report_progress(self.checkpoints, StageProgress(**fields))
        self._losses, self._tokens, self._since = [], 0, now


# --------------------------------------------------------------------------- helpers


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def workdir(prefix: str = "ulmfit-") -> Path:
    """A scratch directory for this process, removed at exit."""
    import atexit

    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def log_to_stderr(rank: int) -> None:
    """Plain log lines on stderr (stdout carries the progress lines), rank-tagged."""
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
