"""Evaluation on the test split and the model export (ULMFiT's last step).

Loads the classifier's final checkpoint (any head; multi-label predictions use the thresholds
tuned on validation), predicts the test split (each rank a share), and reports
accuracy, macro-F1, a per-class report, the confusion matrix, the majority-class baseline and the
expected calibration error. The model goes to ``<run>/model/`` in plain transformers layout
(``AutoModel`` / ``AutoTokenizer.from_pretrained`` load it; id2label in its config) with the head
beside it, and the full report to ``<run>/evaluate/metrics.json``. The stage's metrics are a
``records.EvaluationSummary``: its keys are what the operator and the local runner read.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections import Counter

import torch

from ulmfit_trainer.config import HeadKind, LossKind, StageConfig, StageName
from ulmfit_trainer.data import encode_classification, eval_shard, pad_batch
from ulmfit_trainer.engine import Progress
from ulmfit_trainer.errors import PermanentError
from ulmfit_trainer.models import UlmfitClassifier, probabilities
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
        model_uri = export(ctx, model_dir)
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


def export(ctx: Context, model_dir) -> str:
    """Copy the classifier's export (backbone, head, tokenizer) to ``<run>/model/``."""
    store, key = ctx.checkpoints.store, ctx.checkpoints.artifact_key("model")
    store.delete_prefix(key + "/")
    store.put_dir(key, model_dir)
    return store.uri(key)


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
