"""LM pretraining and LM fine-tuning (ULMFiT stages 1 and 2).

Pretraining reads the unlabeled corpus; fine-tuning reads the target task's own text. Both train
with discriminative rates and a slanted triangular schedule, commit a resumable checkpoint every
``checkpointEvery`` optimizer steps, and finish with a ``final`` checkpoint that is a plain
``save_pretrained`` model directory (what the next stage starts from) plus the metrics.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import DataCollatorForLanguageModeling, PreTrainedModel

from ulmfit_trainer.backbones import check_family
from ulmfit_trainer.config import ModelFamily, StageConfig, StageName
from ulmfit_trainer.data import ShardedOrder, eval_shard, lm_blocks, lm_texts
from ulmfit_trainer.engine import Engine, Progress
from ulmfit_trainer.errors import InvalidSpec, PermanentError
from ulmfit_trainer.models import LayerGroup, LoadedLM, build_lm, family_of, layer_groups, load_lm
from ulmfit_trainer.schedules import discriminative_lrs, total_steps
from ulmfit_trainer.stages import Context
from ulmfit_trainer.tokenize import special_ids, tokenizer_hash

log = logging.getLogger(__name__)


def run(config: StageConfig) -> dict[str, float]:
    ctx = Context.start(config)
    stage, spec, dist = ctx.stage, config.lm, ctx.dist
    assert spec is not None  # StageConfig validates that LM stages carry `lm`
    done = ctx.checkpoints.final(stage)
    if done is not None:
        return done.meta.get("metrics", {})
    progress = Progress(ctx.checkpoints, stage, dist, config.progress_interval_seconds)
    progress.report("starting")

    # The stage this one starts from must be finished: fail before any other work if not.
    init_dir = ctx.init_dir(config.init_from) if config.init_from is not None else None

    # Data: one token stream cut into blocks; every rank builds the same tensor.
    dataset = ctx.dataset()
    tokenizer, tokenizer_dir = ctx.tokenizer()
    block = config.data.max_length
    texts = lm_texts(dataset, pretraining=config.stage == StageName.PRETRAIN)
    train_blocks = lm_blocks(tokenizer, texts, block)
    valid_blocks = lm_blocks(tokenizer, dataset.texts("valid"), block)
    log.info(
        "%d training blocks of %d tokens, %d validation blocks",
        len(train_blocks),
        block,
        len(valid_blocks),
    )

    start_model = initial_model(ctx, tokenizer, tokenizer_hash(tokenizer_dir), init_dir)
    model = start_model.model
    positions = model.config.max_position_embeddings
    if block > positions:
        raise InvalidSpec([("data.maxLength", block, f"exceeds the model's {positions} positions")])
    micro = spec.micro_batch_size or spec.batch_size
    if spec.batch_size % micro:
        raise InvalidSpec(
            [("lm.microBatchSize", micro, f"must divide batchSize {spec.batch_size}")]
        )
    accumulation = spec.batch_size // micro
    order = ShardedOrder(len(train_blocks), micro, dist.rank, dist.world, config.seed)
    steps = total_steps(order.batches_per_epoch, spec.epochs, accumulation, spec.max_steps)

    batches = Batches(model, tokenizer, spec.mask_probability, config.seed, dist)

    def inputs(micro_step: int) -> dict[str, torch.Tensor]:
        return batches(train_blocks[order.batch(*order.position(micro_step))], micro_step)

    # A resumed stage already trained its head (the checkpoint holds it): no warm-up then.
    resumable = dist.broadcast(
        any(not c.final for c in ctx.checkpoints.committed(stage)) if dist.is_main else None
    )
    warmup = 0
    if start_model.fresh and spec.head_warmup > 0 and not resumable:
        warmup = math.ceil(spec.head_warmup * steps)
        warm_up_head(ctx, start_model, warmup, inputs, progress)

    groups = layer_groups(model)
    lrs = discriminative_lrs(spec.learning_rate, len(groups), spec.discriminative_factor)
    engine = Engine(
        model, groups, lrs, steps,
        dist=dist, spec=config.deepspeed, micro_batch=micro, accumulation=accumulation,
        cut_frac=spec.cut_frac, lr_ratio=spec.lr_ratio, weight_decay=spec.weight_decay,
    )  # fmt: skip
    resumed = engine.resume(ctx.checkpoints, stage)
    start = resumed.step if resumed is not None else 0
    if resumed is not None:
        log.info("resumed at step %d from checkpoint %s", start, resumed.tag)
        if dist.is_main:
            print(f"resumed at step {start}", flush=True)

    recent: deque[float] = deque(maxlen=50)
    progress.begin(steps, step=start)
    engine.train()
    started, tokens = time.perf_counter(), 0
    for step in range(start, steps):
        for k in range(accumulation):
            micro_step = step * accumulation + k
            epoch, index = order.position(micro_step)
            batch = inputs(micro_step)
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            recent.append(loss.item())
            tokens += batch["input_ids"].numel()
            progress.update(step + 1, recent[-1], batch["input_ids"].numel())
        done_steps = step + 1
        if done_steps % spec.checkpoint_every == 0 and done_steps < steps:
            position = {
                "step": done_steps,
                "epoch": epoch,
                "batch": index + 1,
                "microStep": micro_step + 1,
                "totalSteps": steps,
            }
            engine.save(ctx.checkpoints, stage, f"step-{done_steps:08d}", position)
            if dist.is_main:
                ctx.checkpoints.prune(stage, config.keep_last)
    train_seconds = time.perf_counter() - started

    valid_loss = evaluate_lm(engine, valid_blocks, micro, batches, dist)
    metrics = {
        "trainLoss": sum(recent) / len(recent) if recent else float("nan"),
        "validLoss": valid_loss,
        "validPerplexity": float(torch.exp(torch.tensor(valid_loss))),
        "steps": float(steps),
        "tokensPerSecond": tokens * dist.world / train_seconds if train_seconds > 0 else 0.0,
        "headWarmupSteps": float(warmup),
    }
    state = engine.full_state_dict()
    engine.close()
    if dist.is_main:
        export = ctx.work / "final"
        model.save_pretrained(str(export), state_dict=state)
        meta: dict[str, Any] = {
            "step": steps,
            "metrics": metrics,
            "family": config.model.family.value,
            "tokenizerHash": tokenizer_hash(tokenizer_dir),
            "resumedFromStep": start if resumed is not None else None,
        }
        ctx.checkpoints.save(stage, "final", export, meta, final=True)
        ctx.checkpoints.prune(stage, config.keep_last)
        progress.report("completed", step=steps, metrics=metrics)
    dist.barrier()
    return metrics


def initial_model(ctx: Context, tokenizer, tok_hash: str, init_dir: Path | None) -> LoadedLM:
    """The previous stage's LM, a pretrained model, or a fresh one built from the architecture."""
    c = ctx.config
    family = c.model.family
    if c.init_from is not None and init_dir is not None:
        ctx.check_tokenizer(c.init_from, tok_hash)
        return load_lm(family, init_dir, len(tokenizer))
    if c.model.pretrained:
        directory = ctx.fetch_pretrained(
            c.model.pretrained, ctx.work / "pretrained", "model.pretrained"
        )
        check_family(family, c.model.pretrained, directory)
        return load_lm(family, directory, len(tokenizer))
    built = build_lm(family, c.model.architecture, len(tokenizer), special_ids(tokenizer))
    return LoadedLM(built, fresh=[])  # all random alike: nothing to warm up before the rest


def warm_up_head(
    ctx: Context,
    start: LoadedLM,
    steps: int,
    inputs: Callable[[int], dict[str, torch.Tensor]],
    progress: Progress,
) -> None:
    """Train the parameters the starting model lacked (``start.fresh``), everything else frozen,
    for ``steps`` optimizer steps on the stage's first batches; not checkpointed (a restart
    repeats it). A pretrained body fine-tuned under a random LM head takes that head's large,
    meaningless gradients in its first steps; a head trained alone first sends useful ones."""
    spec, model = ctx.config.lm, start.model
    assert spec is not None
    micro = spec.micro_batch_size or spec.batch_size
    accumulation = spec.batch_size // micro
    was_trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    fresh = set(start.fresh)
    head = LayerGroup("new-head")
    for name, param in model.named_parameters():
        param.requires_grad = name in fresh
        if name in fresh:
            head.params[name] = param
    log.info("head warm-up: %d steps on %s", steps, ", ".join(sorted(fresh)))
    engine = Engine(
        model, [head], [spec.head_warmup_learning_rate], steps,
        dist=ctx.dist, spec=ctx.config.deepspeed, micro_batch=micro, accumulation=accumulation,
        cut_frac=spec.cut_frac, lr_ratio=spec.lr_ratio, weight_decay=spec.weight_decay,
    )  # fmt: skip
    progress.begin(steps, phase="head warm-up")
    progress.report("running")  # the status names the phase at once, however short it is
    engine.train()
    try:
        for step in range(steps):
            for k in range(accumulation):
                batch = inputs(step * accumulation + k)
                loss = engine(**batch).loss
                engine.backward(loss)
                engine.step()
                progress.update(step + 1, loss.item(), batch["input_ids"].numel())
    finally:
        engine.close()
        for name, param in model.named_parameters():
            param.requires_grad = was_trainable[name]


class Batches:
    """Model inputs from a block of token ids: next-token targets, or masked tokens for BERT."""

    def __init__(self, model: PreTrainedModel, tokenizer, mask_probability: float, seed: int, dist):
        self.masked = isinstance(model, PreTrainedModel) and _is_masked(model)
        self.seed, self.dist = seed, dist
        if self.masked:
            if tokenizer.mask_token is None:
                raise PermanentError("a masked LM needs a tokenizer with a mask token")
            self.collator = DataCollatorForLanguageModeling(
                tokenizer, mlm=True, mlm_probability=mask_probability
            )
            self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)))

    def __call__(self, block: torch.Tensor, micro_step: int) -> dict[str, torch.Tensor]:
        device = self.dist.device
        if not self.masked:
            block = block.to(device)
            return {"input_ids": block, "labels": block}
        # Masks drawn from (seed, micro step, rank): a resumed run masks exactly as before.
        self.collator.generator = torch.Generator().manual_seed(
            self.seed * 1_000_003 + micro_step * self.dist.world + self.dist.rank
        )
        ids, labels = self.collator.torch_mask_tokens(
            block.clone(), special_tokens_mask=torch.isin(block, self.special)
        )
        return {"input_ids": ids.to(device), "labels": labels.to(device)}


def _is_masked(model: PreTrainedModel) -> bool:
    return family_of(model) == ModelFamily.MASKED


@torch.no_grad()
def evaluate_lm(engine: Engine, blocks: torch.Tensor, micro: int, batches: Batches, dist) -> float:
    """Mean loss per predicted token over ``blocks``, every rank taking a share."""
    engine.train(False)
    loss_sum, count = 0.0, 0
    rows = torch.tensor(list(eval_shard(len(blocks), dist.rank, dist.world)), dtype=torch.long)
    for i in range(0, len(rows), micro):
        inputs = batches(blocks[rows[i : i + micro]], -1 - i)
        out = engine(**inputs)
        labels = inputs["labels"]
        predicted = int((labels != -100).sum()) if batches.masked else labels.numel() - len(labels)
        loss_sum += float(out.loss) * predicted
        count += predicted
    engine.train(True)
    total, n = dist.sum(loss_sum, count)
    return total / n if n else float("nan")
