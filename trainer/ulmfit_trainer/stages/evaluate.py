"""Evaluation on the test split and the model export (ULMFiT's last step).

Loads the classifier's final checkpoint (any head; multi-label predictions use the thresholds
tuned on validation), predicts the test split (each rank a share), and reports
accuracy, macro-F1, a per-class report, the confusion matrix, the majority-class baseline and the
expected calibration error. The model goes to ``<run>/model/`` in plain transformers layout
(``AutoModel`` / ``AutoTokenizer.from_pretrained`` load it; id2label in its config) with the head
beside it, the transformers module that runs backbone and head together
(``AutoModelForSequenceClassification`` / ``pipeline`` with ``trust_remote_code``, see
``hf_export``) and a model card (``README.md``); the full report goes to
``<run>/evaluate/metrics.json``. The stage's metrics are a
``records.EvaluationSummary``: its keys are what the operator and the local runner read.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ulmfit_trainer import hf_export
from ulmfit_trainer.config import HeadKind, LossKind, StageConfig, StageName
from ulmfit_trainer.data import encode_classification, eval_shard, pad_batch
from ulmfit_trainer.engine import Progress
from ulmfit_trainer.errors import PermanentError
from ulmfit_trainer.models import HeadSettings, UlmfitClassifier, probabilities
from ulmfit_trainer.records import EvaluationSummary, StageResult
from ulmfit_trainer.stages import Context
from ulmfit_trainer.tokenize import load_tokenizer

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
ECE_BINS = 15


def run(config: StageConfig) -> dict[str, float]:
    ctx = Context.start(config, use_deepspeed=False)  # inference only
    stage, dist = ctx.stage, ctx.dist
    done = ctx.checkpoints.final(stage)
    if done is not None:
        return done.meta.get("metrics", {})
    progress = Progress(ctx.checkpoints, stage, dist, config.progress_interval_seconds)
    progress.report("starting")

    model_dir = ctx.init_dir(config.init_from or StageName.CLASSIFIER)
    model = UlmfitClassifier.load(model_dir).to(dist.device).eval()
    tokenizer = load_tokenizer(model_dir)
    settings = model.settings
    dataset = ctx.dataset()
    if not dataset.has("test"):
        raise PermanentError(f"dataset {config.data.dataset} has no test split")
    if dataset.labels != settings.labels:
        raise PermanentError(
            f"the classifier was trained on labels {settings.labels}, the dataset has "
            f"{dataset.labels}"
        )
    # Hierarchical heads read whole documents (in windows); the others the first maxLength tokens.
    tokens = (
        settings.max_document_tokens
        if settings.kind == HeadKind.HIERARCHICAL
        else config.data.max_length
    )
    test = encode_classification(
        tokenizer, dataset.texts("test"), dataset.targets("test"), settings.labels,
        settings.multi_label, tokens,
    )  # fmt: skip

    # Each rank predicts a share; rank 0 gathers (index, probabilities) and scores.
    batch = config.classifier.batch_size * 2 if config.classifier else 64
    mine: list[tuple[int, list[float]]] = []
    rows = list(eval_shard(len(test), dist.rank, dist.world))
    progress.begin(max(1, (len(rows) + batch - 1) // batch), phase="predict")
    with torch.no_grad():
        for n, i in enumerate(range(0, len(rows), batch)):
            chunk = rows[i : i + batch]
            ids, mask = pad_batch([test.ids[j] for j in chunk], tokenizer.pad_token_id)
            logits = model(ids.to(dist.device), mask.to(dist.device)).float()
            probs = probabilities(LossKind(settings.loss), logits).cpu().tolist()
            mine.extend(zip(chunk, probs, strict=True))
            progress.update(n + 1, None, int(mask.sum()))
    gathered = dist.gather(mine)
    metrics: dict[str, float] = {}
    if dist.is_main:
        ordered = sorted((pair for part in gathered for pair in part), key=lambda p: p[0])
        probs_all = torch.tensor([p for _, p in ordered])
        train = dataset.targets("train") if dataset.has("train") else []
        report = score(
            probs_all, test.targets, settings.labels, settings.multi_label, train,
            thresholds=settings.decision_thresholds(),
        )  # fmt: skip
        summary = EvaluationSummary.model_validate(report["summary"])
        metrics = summary.to_wire()
        card = card_facts(ctx, dataset, settings, model.backbone.config.to_dict(), report)
        model_uri = export(ctx, model_dir, settings, tokenizer, card)
        report["modelUri"] = model_uri
        text = json.dumps(report, indent=2, sort_keys=True) + "\n"
        ctx.checkpoints.store.put_bytes(
            ctx.checkpoints.artifact_key(stage, METRICS_FILE), text.encode()
        )
        # Commit the result as this stage's final checkpoint: a rerun returns it for free.
        out = ctx.work / "evaluate"
        out.mkdir(parents=True, exist_ok=True)
        (out / METRICS_FILE).write_text(text)
        meta = StageResult(metrics=metrics, model_uri=model_uri).to_meta()
        ctx.checkpoints.save(stage, "final", out, meta, final=True)
        log.info("test accuracy %.4f (majority baseline %.4f), model at %s",
                 summary.accuracy, summary.majority_baseline_accuracy, model_uri)  # fmt: skip
        progress.report("completed", metrics=metrics)
    dist.barrier()
    return metrics


def export(
    ctx: Context,
    model_dir: Path,
    settings: HeadSettings,
    tokenizer: Any,
    card: hf_export.CardFacts,
) -> str:
    """Copy the classifier's export (backbone, head, tokenizer) to ``<run>/model/``, with the
    transformers module that runs it (``trust_remote_code``) and its model card."""
    staging = ctx.work / "export-model"
    shutil.rmtree(staging, ignore_errors=True)
    # A copy: the downloaded classifier checkpoint stays as its stage committed it.
    shutil.copytree(model_dir, staging)
    cut = hf_export.truncation(tokenizer, settings.document_tokens)
    try:
        hf_export.add_remote_code(staging, dict(settings.__dict__), cut)
    except hf_export.UnsupportedHead as error:
        # The model itself is fine: ulmfit predict and the bare AutoModel still read it.
        log.warning("%s; the export is for ulmfit predict only", error)
        card.remote_code, card.remote_code_note = False, str(error)
    (staging / hf_export.MODEL_CARD).write_text(hf_export.model_card(card), encoding="utf-8")
    store, key = ctx.checkpoints.store, ctx.checkpoints.artifact_key("model")
    store.delete_prefix(key + "/")
    store.put_dir(key, staging)
    return store.uri(key)


# Hyperparameters a model card lists for the classifier stage (wire names of the spec).
_CARD_CLASSIFIER_KEYS = (
    "head", "learningRate", "unfreezePhases", "epochsPerPhase", "finalEpochs", "batchSize",
    "discriminativeFactor", "lrDecayPerPhase", "dropout", "headHiddenSize", "loss",
    "labelSmoothing", "classWeighting", "tuneThresholds",
)  # fmt: skip


def card_facts(
    ctx: Context, dataset: Any, settings: HeadSettings, backbone: dict[str, Any], report: dict
) -> hf_export.CardFacts:
    """What the model card says, from this stage's config and the earlier stages' records."""
    c = ctx.config
    stages = []
    model = c.model
    origin = f"pretrained `{model.pretrained}`" if model.pretrained else "built from scratch"
    for name in (StageName.PRETRAIN, StageName.FINETUNE, StageName.TUNE, StageName.CLASSIFIER):
        final = ctx.checkpoints.final(name.value)
        if final is None:
            continue
        meta = final.meta
        details: dict[str, Any] = {}
        if name in (StageName.PRETRAIN, StageName.FINETUNE):
            details = {"steps": meta.get("step"), "family": meta.get("family")}
        elif name == StageName.TUNE:
            details = dict(meta.get("bestParams") or meta.get("best_params") or {})
        elif c.classifier is not None:
            wire = c.classifier.to_wire()
            details = {key: wire[key] for key in _CARD_CLASSIFIER_KEYS if key in wire}
            details["phases run"] = len(meta.get("history", []))
        stages.append(hf_export.StageSummary(
            name.value,
            {k: v for k, v in details.items() if v is not None},
            _scalars(meta.get("metrics", {})),
        ))  # fmt: skip
    sizes = {split: len(dataset.texts(split)) for split in ("train", "valid", "test", "unlabeled")
             if dataset.has(split)}  # fmt: skip
    return hf_export.CardFacts(
        run=c.run,
        dataset=c.data.dataset,
        labels=list(settings.labels),
        multi_label=settings.multi_label,
        split_sizes=sizes,
        backbone={**backbone, "origin": origin},
        head=dict(settings.__dict__),
        stages=stages,
        test_metrics=_scalars(report.get("summary", {})),
        per_class=report.get("perClass", {}),
    )


def _scalars(values: dict) -> dict[str, float]:
    return {
        k: float(v) for k, v in values.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }  # fmt: skip


# --------------------------------------------------------------------------- scoring


def score(
    probs: torch.Tensor,
    targets: torch.Tensor,
    labels: list[str],
    multi_label: bool,
    train_targets: list,
    thresholds: list[float] | None = None,
) -> dict:
    """The full report; ``summary`` holds the flat numbers a stage returns (an
    ``EvaluationSummary`` on the wire). Multi-label predictions are the labels whose probability
    reaches its threshold (default 0.5)."""
    if multi_label:
        cuts = thresholds or [0.5] * len(labels)
        return _score_multi_label(probs, targets, labels, train_targets, cuts)
    n_labels = len(labels)
    predicted = probs.argmax(-1)
    confusion = torch.zeros((n_labels, n_labels), dtype=torch.long)
    for t, p in zip(targets.tolist(), predicted.tolist(), strict=True):
        confusion[t, p] += 1
    per_class = _per_class(confusion, labels)
    accuracy = float((predicted == targets).float().mean())
    macro_f1 = sum(c["f1"] for c in per_class.values()) / n_labels
    majority_label, majority_accuracy = None, 0.0
    if train_targets:
        majority_label = Counter(str(t) for t in train_targets).most_common(1)[0][0]
        index = labels.index(majority_label)
        majority_accuracy = float((targets == index).float().mean())
    confidence, _ = probs.max(-1)
    ece = expected_calibration_error(confidence, (predicted == targets).float())
    summary = EvaluationSummary(
        accuracy=accuracy,
        macro_f1=macro_f1,
        majority_baseline_accuracy=majority_accuracy,
        expected_calibration_error=ece,
        test_examples=float(len(targets)),
    ).to_wire()
    return {
        "summary": summary,
        "labels": labels,
        "perClass": per_class,
        "confusionMatrix": confusion.tolist(),
        "confusionMatrixAxes": "rows: true label, columns: predicted label",
        "majorityBaseline": {"label": majority_label, "accuracy": majority_accuracy},
    }


def _per_class(confusion: torch.Tensor, labels: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    for i, label in enumerate(labels):
        tp = float(confusion[i, i])
        predicted, support = float(confusion[:, i].sum()), float(confusion[i].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return out


def _score_multi_label(probs, targets, labels, train_targets, thresholds) -> dict:
    predicted = (probs >= torch.tensor(thresholds, dtype=probs.dtype)).float()
    per_class = {}
    for i, label in enumerate(labels):
        tp = float((predicted[:, i] * targets[:, i]).sum())
        fp = float((predicted[:, i] * (1 - targets[:, i])).sum())
        fn = float(((1 - predicted[:, i]) * targets[:, i]).sum())
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        support = float(targets[:, i].sum())
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    exact = float((predicted == targets).all(-1).float().mean())
    majority_accuracy, majority = 0.0, None
    if train_targets:
        sets = Counter(tuple(sorted(t if isinstance(t, list) else [t])) for t in train_targets)
        majority = list(sets.most_common(1)[0][0])
        row = torch.zeros(len(labels))
        for label in majority:
            row[labels.index(label)] = 1.0
        majority_accuracy = float((targets == row).all(-1).float().mean())
    ece = expected_calibration_error(
        torch.where(predicted > 0, probs, 1 - probs).flatten(),
        (predicted == targets).float().flatten(),
    )
    summary = EvaluationSummary(
        accuracy=exact,
        macro_f1=sum(c["f1"] for c in per_class.values()) / len(labels),
        majority_baseline_accuracy=majority_accuracy,
        expected_calibration_error=ece,
        test_examples=float(len(targets)),
    ).to_wire()
    return {
        "summary": summary,
        "labels": labels,
        "perClass": per_class,
        "majorityBaseline": {"labels": majority, "accuracy": majority_accuracy},
        "thresholds": dict(zip(labels, thresholds, strict=True)),
    }


def expected_calibration_error(
    confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS
) -> float:
    """Sum over equal-width confidence bins of |accuracy - mean confidence| x bin share."""
    if not len(confidence):
        return 0.0
    edges = torch.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges.tolist()):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            gap = correct[in_bin].mean() - confidence[in_bin].mean()
            ece += float(gap.abs()) * float(in_bin.float().mean())
    return ece
