"""Gradual unfreezing of a classifier on a training set: what the classifier stage, each
co-training model and each sweep trial train with (ULMFiT stage 3).

The fine-tuned LM's encoder gets the head the spec selects (concat pooling, attention pooling,
hierarchical windows, or the generative verbalizer scorer; see ``models``). Phase 1 trains the
head alone; each later phase unfreezes one more layer group from the top
(``schedules.unfreeze_plan``) and the last one trains everything, for
``epochsPerPhase + finalEpochs``. Each phase is its own slanted triangular cycle with
discriminative rates, peaking at ``learningRate * lrDecayPerPhase^(k-1)``, on a fresh
DeepSpeed engine (ZeRO partitions only what is trainable when the engine is made).

Every finished phase is committed (tag ``phase-01``, ...; the last phase's is the ``final``
checkpoint: the exported model with its tokenizer), so a restart resumes after the last finished
phase. Here live `fit`, `TrainingSet`, the head settings and the validation scores; the stages
that call `fit` import this module, never each other.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ulmfit_trainer.backbones import check_family
from ulmfit_trainer.config import ClassifierStageSpec, HeadKind, LossKind, ModelFamily, StageConfig
from ulmfit_trainer.data import Encoded, ShardedOrder, encode_classification, eval_shard, pad_batch
from ulmfit_trainer.engine import Engine, Progress
from ulmfit_trainer.errors import InvalidSpec
from ulmfit_trainer.losses import class_weights, f1, tune_thresholds
from ulmfit_trainer.models import (
    HeadSettings,
    UlmfitClassifier,
    build_lm,
    classification_loss,
    default_loss,
    generative_settings,
    layer_groups,
    load_backbone,
    probabilities,
    set_trainable,
)
from ulmfit_trainer.schedules import discriminative_lrs, total_steps, unfreeze_plan
from ulmfit_trainer.stages import Context
from ulmfit_trainer.tokenize import special_ids, tokenizer_hash

log = logging.getLogger(__name__)


def phase_tag(phase: int) -> str:
    return f"phase-{phase:02d}"


CALIBRATION_TEXTS = 128
"""Generative head: unlabeled training texts whose mean label scores set the head's bias."""

Report = Callable[[dict[str, float]], None]
"""Called on rank 0 after each phase's validation with the metrics so far (a Tune trainable
reports them; early stopping ends the run by raising from inside)."""


@dataclass
class TrainingSet:
    """Labeled training documents: texts and their raw labels (a string, or a list of them)."""

    texts: list[str]
    targets: list[str | list[str]]

    def __len__(self) -> int:
        return len(self.texts)

    def extend(self, texts: list[str], targets: list) -> TrainingSet:
        return TrainingSet(self.texts + list(texts), self.targets + list(targets))


def fit(
    ctx: Context,
    spec: ClassifierStageSpec,
    training: TrainingSet,
    *,
    report: Report | None = None,
    final: bool = True,
    extra_metrics: dict[str, float] | None = None,
) -> tuple[UlmfitClassifier, dict[str, float]]:
    """Gradual unfreezing on ``training``; every phase committed under ``ctx.stage``.

    Resumes after the last committed phase (a rerun after the last one trains nothing). With
    ``final=False`` the last phase is committed as an ordinary phase and the caller commits the
    stage's final checkpoint itself (a cotrain model adds its votes to it). ``extra_metrics``
    join every phase's metrics.
    """
    config, stage, dist = ctx.config, ctx.stage, ctx.dist
    progress = Progress(ctx.checkpoints, stage, dist, config.progress_interval_seconds)
    progress.report("starting")

    if spec.batch_size < 2:
        # The head's BatchNorm needs at least two documents per rank to standardise over.
        raise InvalidSpec([("classifier.batchSize", spec.batch_size, "must be at least 2")])
    # The stage this one starts from must be finished: fail before any other work if not.
    finished = [c for c in ctx.checkpoints.committed(stage) if c.tag.startswith("phase-")]
    init_dir = None
    if config.init_from is not None and not finished:
        init_dir = ctx.init_dir(config.init_from)
    dataset = ctx.dataset()
    tokenizer, tokenizer_dir = ctx.tokenizer()
    tok_hash = tokenizer_hash(tokenizer_dir)
    loss_kind = default_loss(dataset.multi_label, spec.loss)
    pad_id = tokenizer.pad_token_id

    settings = head_settings(config, spec, tokenizer, dataset.labels, dataset.multi_label)
    settings.loss = loss_kind.value
    weights = class_weights(spec, dataset.labels, training.targets)
    loss_weights = torch.tensor(weights) if weights is not None else None
    train = encode_classification(
        tokenizer, training.texts, training.targets, dataset.labels,
        dataset.multi_label, settings.document_tokens,
    )  # fmt: skip
    valid = encode_classification(
        tokenizer, dataset.texts("valid"), dataset.targets("valid"), dataset.labels,
        dataset.multi_label, settings.document_tokens,
    )  # fmt: skip

    # Resume after the last finished phase, or start from the fine-tuned LM.
    if finished:
        last = max(finished, key=lambda c: int(c.phase or 0))
        directory = ctx.work / "resume"
        ctx.checkpoints.load(stage, directory, tag=last.tag)
        model = UlmfitClassifier.load(directory)
        first_phase, history = int(last.phase or 0), list(last.meta.get("history", []))
        metrics: dict[str, float] = dict(last.meta.get("metrics", {}))
        log.info("resumed after phase %d (checkpoint %s)", first_phase, last.tag)
        if dist.is_main:
            print(f"resumed at phase {first_phase + 1}", flush=True)
    else:
        model = UlmfitClassifier(initial_backbone(ctx, tokenizer, tok_hash, init_dir), settings)
        first_phase, history, metrics = 0, [], {}
        if settings.kind == HeadKind.GENERATIVE:
            # Calibrate on training texts (their labels unused), then measure the head's
            # zero-shot accuracy before any classifier training.
            model.to(dist.device).calibrate(train.ids[:CALIBRATION_TEXTS], pad_id)
            zero_shot = evaluate_classifier(
                model.to(dist.device), valid, spec.batch_size, pad_id, loss_kind, dist
            )
            if zero_shot:
                metrics["validAccuracyZeroShot"] = zero_shot["validAccuracy"]
                log.info("zero-shot: %s", zero_shot)

    groups = layer_groups(model)
    plan = unfreeze_plan(len(groups), spec.unfreeze_phases)
    order = ShardedOrder(len(train), spec.batch_size, dist.rank, dist.world, config.seed)
    step_base = sum(int(h["steps"]) for h in history)

    for k in range(first_phase, len(plan)):
        phase, last_phase = k + 1, k + 1 == len(plan)
        set_trainable(groups, plan[k])
        peak = spec.learning_rate * spec.lr_decay_per_phase**k
        lrs = discriminative_lrs(peak, len(groups), spec.discriminative_factor)
        epochs = spec.epochs_per_phase + (spec.final_epochs if last_phase else 0.0)
        steps = total_steps(order.batches_per_epoch, epochs, 1, None)
        log.info(
            "phase %d/%d: top %d of %d layer groups trainable, peak lr %.2e, %d steps",
            phase, len(plan), plan[k], len(groups), peak, steps,
        )  # fmt: skip
        engine = Engine(
            model, groups, lrs, steps,
            dist=dist, spec=config.deepspeed, micro_batch=spec.batch_size, accumulation=1,
            cut_frac=spec.cut_frac, lr_ratio=spec.lr_ratio, weight_decay=spec.weight_decay,
        )  # fmt: skip
        progress.begin(steps, phase=f"{phase}/{len(plan)}")
        engine.train()
        recent: deque[float] = deque(maxlen=50)
        started = time.perf_counter()
        for step in range(steps):
            epoch, index = order.position(step)
            # A fresh permutation per phase: (phase, epoch) picks it.
            rows = order.batch(epoch + 1000 * phase, index).tolist()
            ids, mask = pad_batch([train.ids[i] for i in rows], pad_id)
            logits = engine(input_ids=ids.to(dist.device), attention_mask=mask.to(dist.device))
            targets = train.targets[rows].to(dist.device)
            loss = classification_loss(
                loss_kind, logits.float(), targets, spec.label_smoothing, class_weights=loss_weights
            )
            engine.backward(loss)
            engine.step()
            recent.append(loss.item())
            progress.update(step + 1, recent[-1], int(mask.sum()))
        seconds = time.perf_counter() - started
        valid_metrics = evaluate_classifier(engine, valid, spec.batch_size, pad_id, loss_kind, dist)
        if last_phase and tuned(spec, settings):
            # Thresholds are the final model's: tuned once, on its validation predictions.
            probs = valid_probabilities(engine, valid, spec.batch_size, pad_id, loss_kind, dist)
            model.settings.thresholds = tune_thresholds(probs.tolist(), valid.targets.tolist())
            valid_metrics.update(
                validation_scores(
                    probs, valid.targets, model.settings.decision_thresholds(), "Tuned"
                )
            )
        state = engine.full_state_dict()
        engine.close()
        train_loss = sum(recent) / len(recent)
        history.append({
            "phase": phase, "trainableGroups": plan[k], "peakLr": peak, "steps": steps,
            "trainLoss": train_loss, "seconds": seconds, **valid_metrics,
        })  # fmt: skip
        step_base += steps
        log.info("phase %d: train loss %.4f, %s", phase, train_loss, valid_metrics)
        metrics = {
            **{k: v for k, v in metrics.items() if k == "validAccuracyZeroShot"},
            "trainLoss": train_loss,
            **valid_metrics,
            "phases": float(len(plan)),
            "trainExamples": float(len(train)),
            **(extra_metrics or {}),
            **{f"validAccuracyPhase{h['phase']}": h["validAccuracy"] for h in history},
        }
        if dist.is_main:
            export = ctx.work / phase_tag(phase)
            model.save(export, state)
            meta = {
                "step": step_base, "phase": phase, "history": history, "metrics": metrics,
                "tokenizerHash": tok_hash, "trainableGroups": plan[k],
            }  # fmt: skip
            if last_phase and final:
                # The final checkpoint is the export: transformers layout, head and tokenizer.
                tokenizer.save_pretrained(str(export))
                ctx.checkpoints.save(stage, "final", export, meta, final=True)
            else:
                ctx.checkpoints.save(stage, phase_tag(phase), export, meta)
            if report is not None:
                report({**metrics, "phase": float(phase)})
        dist.barrier()
    if dist.is_main and final:
        progress.report("completed", metrics=metrics)
    return model, metrics


def initial_backbone(ctx: Context, tokenizer, tok_hash: str, init_dir: Path | None):
    """The encoder of the previous stage's LM, of a pretrained model, or a fresh one."""
    c = ctx.config
    if c.init_from is not None and init_dir is not None:
        ctx.check_tokenizer(c.init_from, tok_hash)
        return load_backbone(init_dir)
    if c.model.pretrained:
        directory = ctx.fetch_pretrained(
            c.model.pretrained, ctx.work / "pretrained", "model.pretrained"
        )
        check_family(c.model.family, c.model.pretrained, directory)
        return load_backbone(directory)
    # No LM stage before this one: a from-scratch baseline.
    lm = build_lm(c.model.family, c.model.architecture, len(tokenizer), special_ids(tokenizer))
    return lm.base_model


def head_settings(
    config: StageConfig, spec: ClassifierStageSpec, tokenizer, labels: list[str], multi_label: bool
) -> HeadSettings:
    """The head the spec asks for, checked against the model family and the data settings."""
    family, max_length = config.model.family, config.data.max_length
    common: dict[str, Any] = {
        "family": family.value, "hidden_size": spec.head_hidden_size, "dropout": spec.dropout,
        "multi_label": multi_label, "max_length": max_length,
        "attention_heads": spec.attention_heads, "window_overlap": spec.window_overlap,
        "max_document_tokens": spec.max_document_tokens,
    }  # fmt: skip
    if spec.head == HeadKind.GENERATIVE:
        if family != ModelFamily.CAUSAL:
            raise InvalidSpec([(
                "stages.classifier.head", spec.head.value,
                f"the generative head scores text with a causal LM; model.family is {family.value}",
            )])  # fmt: skip
        unknown = sorted(set(spec.verbalizers) - set(labels))
        if unknown:
            raise InvalidSpec([(
                "stages.classifier.verbalizers", unknown[0],
                f"is not a label of the dataset (labels: {labels})",
            )])  # fmt: skip
        return generative_settings(tokenizer, labels, spec.verbalizers, spec.prompt, **common)
    if spec.head == HeadKind.HIERARCHICAL and spec.window_overlap >= max_length:
        raise InvalidSpec([(
            "stages.classifier.windowOverlap", spec.window_overlap,
            f"must be less than the window length data.maxLength {max_length}",
        )])  # fmt: skip
    return HeadSettings(labels=labels, head=spec.head.value, **common)


def tuned(spec: ClassifierStageSpec, settings: HeadSettings) -> bool:
    """Whether per-label thresholds are tuned: sigmoid loss on multi-label data, when asked."""
    return spec.tune_thresholds and settings.multi_label and settings.loss == LossKind.SIGMOID


@torch.no_grad()
def valid_logits(module, data: Encoded, batch_size: int, pad_id: int, dist) -> torch.Tensor:
    """Logits of every document of ``data`` in order, on every rank (each predicts a share)."""
    was_training = module.training if isinstance(module, torch.nn.Module) else True
    module.train(False)
    mine: list[tuple[int, list[float]]] = []
    rows = list(eval_shard(len(data), dist.rank, dist.world))
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        ids, mask = pad_batch([data.ids[j] for j in chunk], pad_id)
        logits = module(input_ids=ids.to(dist.device), attention_mask=mask.to(dist.device))
        mine.extend(zip(chunk, logits.float().cpu().tolist(), strict=True))
    module.train(was_training)
    ordered = sorted((pair for part in dist.gather(mine) for pair in part), key=lambda p: p[0])
    return torch.tensor([logits for _, logits in ordered])


def valid_probabilities(module, data: Encoded, batch_size: int, pad_id: int, loss_kind, dist):
    return probabilities(loss_kind, valid_logits(module, data, batch_size, pad_id, dist))


def validation_scores(
    probs: torch.Tensor, targets: torch.Tensor, thresholds: list[float], suffix: str = ""
) -> dict[str, float]:
    """Accuracy (exact match for multi-label) and macro-F1 of ``probs`` against ``targets``."""
    n_labels = probs.size(-1)
    if targets.dim() == 1:
        predicted = probs.argmax(-1)
        accuracy = float((predicted == targets).float().mean())
        hits = F.one_hot(predicted, n_labels).bool()
        actual = F.one_hot(targets, n_labels).bool()
    else:
        hits = probs >= torch.tensor(thresholds)
        actual = targets >= 0.5
        accuracy = float((hits == actual).all(-1).float().mean())
    f1s = [f1(hits[:, c].tolist(), actual[:, c].tolist()) for c in range(n_labels)]
    return {
        f"validAccuracy{suffix}": accuracy,
        f"validMacroF1{suffix}": sum(f1s) / n_labels,
    }


def evaluate_classifier(
    engine, data: Encoded, batch_size: int, pad_id: int, loss_kind, dist
) -> dict[str, float]:
    """Validation loss, accuracy (exact match at 0.5 for multi-label) and macro-F1; every rank
    predicts a share and every rank returns the same numbers."""
    if not len(data):
        return {}
    logits = valid_logits(engine, data, batch_size, pad_id, dist)
    loss = float(classification_loss(loss_kind, logits, data.targets))
    probs = probabilities(loss_kind, logits)
    scores = validation_scores(probs, data.targets, [0.5] * probs.size(-1))
    return {"validLoss": loss, **scores}
