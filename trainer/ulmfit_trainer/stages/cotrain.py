"""Co-training on weak labels: one of the K classifiers that pseudo-label the unlabeled pool.

The pool is the dataset's unlabeled split plus, when ``data.maxTrainExamples`` leaves labeled
train documents unused, those documents with their gold label hidden from training (kept only to
score the weak and pseudo labels), capped to ``maxPoolExamples`` by a seeded sample. Each model
trains on the gold train set, the pool documents its weak source labels (rules or a noisy label
field) and, from round 2 on, the previous round's pseudo-labels, all read through its own view
(text field, head or tail of the document). It then predicts the whole pool; its final checkpoint
holds those votes, and ``pseudo_labels`` turns the votes of several models into training labels
where enough of them agree confidently. The training itself is ``fitting.fit``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ulmfit_trainer import weak
from ulmfit_trainer.config import (
    CotrainModelSpec,
    CotrainSpec,
    LossKind,
    StageConfig,
    Truncation,
)
from ulmfit_trainer.data import TextDataset, dataset_dir, eval_shard, pad_batch, read_jsonl
from ulmfit_trainer.data import seeded_sample as sample
from ulmfit_trainer.engine import Progress
from ulmfit_trainer.errors import InvalidSpec, PermanentError
from ulmfit_trainer.models import UlmfitClassifier, probabilities
from ulmfit_trainer.stages import Context
from ulmfit_trainer.stages.fitting import TrainingSet, fit
from ulmfit_trainer.store import NoCheckpoint

log = logging.getLogger(__name__)

VOTES_FILE = "votes.jsonl"
POOL_FILE = "pool.jsonl"
POOL_SALT = "cotrain-pool"


@dataclass(frozen=True)
class PoolDocument:
    id: str
    """`unlabeled-<row>` or `train-<row>` (row of the split as read): the same in every stage."""
    row: dict[str, Any]
    gold: str | None
    """The hidden gold label of an unused train document."""


# --------------------------------------------------------------------------- the pool


def _train_rows(ctx: Context) -> list[dict]:
    """The full train split as stored, before ``maxTrainExamples`` samples it."""
    directory = dataset_dir(ctx.config.data.dataset, ctx.config.s3, ctx.work)
    for name in ("train.jsonl.gz", "train.jsonl"):
        if (directory / name).exists():
            return read_jsonl(directory / name)
    return []


def pool_documents(ctx: Context) -> list[PoolDocument]:
    """The unlabeled pool, identical on every rank and in every stage of the job."""
    config = ctx.config
    assert config.cotrain is not None
    dataset = ctx.dataset()
    docs = [
        PoolDocument(f"unlabeled-{i}", row, None)
        for i, row in enumerate(dataset.splits.get("unlabeled", []))
    ]
    cap = config.data.max_train_examples
    if cap is not None:
        rows = _train_rows(ctx)
        # The very indices load_dataset keeps: seeded_sample draws from range(len(items)) alone.
        used = set(sample(list(range(len(rows))), cap, config.seed, "train"))
        label_field = config.data.label_field
        docs += [
            PoolDocument(f"train-{i}", row, _single_label(row.get(label_field)))
            for i, row in enumerate(rows)
            if i not in used
        ]
    return sample(docs, config.cotrain.max_pool_examples, config.seed, POOL_SALT)


def _single_label(value: object) -> str | None:
    return None if value is None or isinstance(value, list) else str(value)


# --------------------------------------------------------------------------- a model's view


class View:
    """What one model reads: a text field, cut at the head or kept at the tail."""

    def __init__(self, field: str, truncation: Truncation, tokenizer, max_length: int, where: str):
        self.field, self.truncation, self.where = field, truncation, where
        self.tokenizer, self.max_length = tokenizer, max_length

    def raw(self, rows: list[dict]) -> list[str]:
        texts = []
        for row in rows:
            if self.field not in row:
                raise InvalidSpec(
                    [(f"{self.where}.textField", self.field, "not a key of every row")]
                )
            texts.append(str(row[self.field]))
        return texts

    def texts(self, rows: list[dict]) -> list[str]:
        raw = self.raw(rows)
        if self.truncation == Truncation.HEAD or not raw:
            return raw  # the encoder's own truncation keeps the head
        return tail_texts(self.tokenizer, raw, self.max_length)


def tail_texts(tokenizer, texts: list[str], max_length: int) -> list[str]:
    """Each text cut to (about) its last ``max_length`` tokens, special tokens included.

    Cutting the string at a token's start offset keeps the view a plain text, so the classifier's
    encoding (which keeps the head) can read it unchanged; re-tokenizing a cut text may differ by
    a token at the cut.
    """
    keep = max(1, max_length - tokenizer.num_special_tokens_to_add())
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for text, offsets in zip(texts, encoded["offset_mapping"], strict=True):
        out.append(text[offsets[-keep][0] :] if len(offsets) > keep else text)
    return out


def _model_index(spec: CotrainSpec, name: str | None) -> int:
    for index, model in enumerate(spec.models):
        if model.name == name:
            return index
    names = [m.name for m in spec.models]
    raise InvalidSpec([("cotrainModel", name, f"not one of stages.cotrain.models {names}")])


def weak_labels(
    model: CotrainModelSpec, where: str, docs: list[PoolDocument], texts: list[str], labels: list
) -> dict[str, str]:
    """Pool document id -> the label this model's weak source gives it (rules, else the field)."""
    known = set(labels)
    for j, rule in enumerate(model.rules):
        if rule.label not in known:
            raise InvalidSpec([(f"{where}.rules[{j}].label", rule.label, f"not one of {labels}")])
    out: dict[str, str] = {}
    if model.rules:
        rules = weak.compile_rules(model.rules)
        for doc, text in zip(docs, texts, strict=True):
            label = weak.weak_label(text, rules)
            if label is not None:
                out[doc.id] = label
    if model.noisy_label_field:
        skipped = 0
        for doc in docs:
            value = doc.row.get(model.noisy_label_field)
            if doc.id in out or value is None:
                continue
            if str(value) in known:
                out[doc.id] = str(value)
            else:
                skipped += 1  # a noisy source may use labels this task does not have
        if skipped:
            log.info("%s: %d noisy labels outside the label set ignored", where, skipped)
    return out


# --------------------------------------------------------------------------- the stage


def run(config: StageConfig) -> dict[str, float]:
    """Train this stage's co-training model and commit its votes on the pool."""
    ctx = Context.start(config)
    done = ctx.checkpoints.final(ctx.stage)
    if done is not None:
        return done.meta.get("metrics", {})
    cotrain, spec_all = config.cotrain, config.classifier
    assert cotrain is not None and spec_all is not None  # StageConfig validates both
    index = _model_index(cotrain, config.cotrain_model)
    model_spec, where = cotrain.models[index], f"stages.cotrain.models[{index}]"
    spec = cotrain.classifier or spec_all
    dataset = ctx.dataset()
    if not dataset.has("train"):
        raise PermanentError(f"dataset {config.data.dataset} has no labeled train split")
    if dataset.multi_label:
        raise PermanentError("co-training needs one label per document; the dataset has lists")
    pool = pool_documents(ctx)
    if not pool:
        raise PermanentError(
            f"co-training needs a pool: dataset {config.data.dataset} has no unlabeled split and "
            "data.maxTrainExamples leaves no train document unused"
        )
    tokenizer, _ = ctx.tokenizer()
    view = View(
        model_spec.text_field or config.data.text_field, model_spec.truncation, tokenizer,
        config.data.max_length, where,
    )  # fmt: skip

    pool_rows = [doc.row for doc in pool]
    weak_by_doc = weak_labels(model_spec, where, pool, view.raw(pool_rows), dataset.labels)
    gold = {doc.id: doc.gold for doc in pool if doc.gold is not None}
    correct, compared = weak.accuracy(weak_by_doc, gold)
    extra: dict[str, float] = {"weakLabels": float(len(weak_by_doc)), "poolSize": float(len(pool))}
    if compared:
        extra["weakLabelAccuracy"] = correct / compared
    # From round 2 on, the previous round's agreed labels take precedence over the weak ones.
    labels_by_doc = dict(weak_by_doc)
    if config.pseudo_labels_from:
        accepted, _, about = combine_votes(ctx, config.pseudo_labels_from)
        labels_by_doc.update({doc: p.label for doc, p in accepted.items()})
        extra["pseudoLabels"] = about["pseudoLabels"]

    pool_texts = view.texts(pool_rows)
    text_of = {doc.id: text for doc, text in zip(pool, pool_texts, strict=True)}
    train_rows = dataset.splits["train"]
    training = TrainingSet(view.texts(train_rows), dataset.targets("train"))
    chosen = [doc.id for doc in pool if doc.id in labels_by_doc]
    training = training.extend([text_of[d] for d in chosen], [labels_by_doc[d] for d in chosen])
    log.info(
        "model %s: %d gold + %d weak/pseudo-labelled documents, pool %d",
        model_spec.name, len(train_rows), len(chosen), len(pool),
    )  # fmt: skip

    view_ctx = dataclasses.replace(ctx, _dataset=_view_dataset(dataset, view))
    fit(view_ctx, spec, training, final=False, extra_metrics=extra)
    model, last = _trained_model(ctx)
    votes = predict(ctx, model, tokenizer, pool_texts, spec.batch_size * 2)
    metrics = {**last.meta.get("metrics", {}), **extra}
    if ctx.dist.is_main:
        out = ctx.work / "votes"
        out.mkdir(parents=True, exist_ok=True)
        _write_jsonl(out / VOTES_FILE, [
            {"id": doc.id, "label": label, "confidence": round(conf, 6),
             **({"weak": weak_by_doc[doc.id]} if doc.id in weak_by_doc else {})}
            for doc, (label, conf) in zip(pool, votes, strict=True)
        ])  # fmt: skip
        _write_jsonl(out / POOL_FILE, [
            {"id": doc.id, "text": str(doc.row.get(config.data.text_field, "")),
             **({"gold": doc.gold} if doc.gold is not None else {})}
            for doc in pool
        ])  # fmt: skip
        meta = {
            # One step past the phase it was made from: stores order checkpoints by (step, tag),
            # and the final one must come out as the latest.
            "step": last.step + 1, "metrics": metrics, "model": model_spec.name,
            "round": config.cotrain_round, "labels": dataset.labels,
            "cotrain": cotrain.to_wire(), "history": last.meta.get("history", []),
        }  # fmt: skip
        ctx.checkpoints.save(ctx.stage, "final", out, meta, final=True)
        progress = Progress(ctx.checkpoints, ctx.stage, ctx.dist, config.progress_interval_seconds)
        progress.report("completed", metrics=metrics)
    ctx.dist.barrier()
    return metrics


def _view_dataset(dataset: TextDataset, view: View) -> TextDataset:
    """The dataset as this model sees it, so validation reads the same view as training."""
    splits = {
        split: [
            {dataset.text_field: text, dataset.label_field: row[dataset.label_field]}
            for row, text in zip(rows, view.texts(rows), strict=True)
        ]
        for split, rows in dataset.splits.items()
        if split in ("train", "valid")
    }
    return TextDataset(
        splits, dataset.text_field, dataset.label_field, dataset.labels, dataset.multi_label
    )


def _trained_model(ctx: Context):
    """The last committed phase (what fit just trained, or trained before a crash)."""
    phases = [c for c in ctx.checkpoints.committed(ctx.stage) if c.tag.startswith("phase-")]
    last = max(phases, key=lambda c: int(c.phase or 0))
    directory = ctx.work / "trained"
    ctx.checkpoints.load(ctx.stage, directory, tag=last.tag)
    return UlmfitClassifier.load(directory), last


@torch.no_grad()
def predict(
    ctx: Context, model: UlmfitClassifier, tokenizer, texts: list[str], batch_size: int
) -> list[tuple[str, float]]:
    """(label, probability) per text; each rank predicts a share, every rank gets them all."""
    dist, settings = ctx.dist, model.settings
    model = model.to(dist.device).eval()
    kind = LossKind(settings.loss)
    mine = list(eval_shard(len(texts), dist.rank, dist.world))
    found: list[tuple[int, int, float]] = []
    for start in range(0, len(mine), batch_size):
        rows = mine[start : start + batch_size]
        encoded = tokenizer(
            [texts[i] for i in rows], truncation=True, max_length=settings.document_tokens
        )["input_ids"]
        ids, mask = pad_batch(encoded, tokenizer.pad_token_id)
        logits = model(input_ids=ids.to(dist.device), attention_mask=mask.to(dist.device))
        confidence, best = probabilities(kind, logits.float()).max(dim=-1)
        found += zip(rows, best.tolist(), confidence.tolist(), strict=True)
    merged = sorted(part for share in dist.gather(found) for part in share)
    return [(settings.labels[best], conf) for _, best, conf in merged]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- pseudo-labels


@dataclass
class StoredVotes:
    key: str
    votes: dict[str, weak.Vote]
    weak: dict[str, str]
    meta: dict[str, Any]


def _load_votes(ctx: Context, key: str) -> tuple[StoredVotes, Path]:
    directory = ctx.work / f"votes-{key}"
    try:
        checkpoint = ctx.checkpoints.load(key, directory, tag="final")
    except NoCheckpoint:
        raise PermanentError(
            f"stage {ctx.stage} reads the pseudo-labels of {key}, which has no final checkpoint "
            f"under {ctx.checkpoints.store.uri(ctx.checkpoints.run)}"
        ) from None
    rows = read_jsonl(directory / VOTES_FILE)
    votes = {r["id"]: weak.Vote(r["label"], float(r["confidence"])) for r in rows}
    weak_by_doc = {r["id"]: r["weak"] for r in rows if "weak" in r}
    return StoredVotes(key, votes, weak_by_doc, checkpoint.meta), directory


def combine_votes(
    ctx: Context, keys: list[str]
) -> tuple[dict[str, weak.PseudoLabel], dict[str, dict], dict[str, float]]:
    """(accepted pseudo-labels by document id, the pool's records by id, metrics about them)."""
    loaded = [_load_votes(ctx, key) for key in keys]
    stored = [votes for votes, _ in loaded]
    pool = {r["id"]: r for r in read_jsonl(loaded[0][1] / POOL_FILE)}
    spec = ctx.config.cotrain or CotrainSpec.model_validate(stored[0].meta["cotrain"])
    accepted = weak.select_pseudo_labels(
        [s.votes for s in stored],
        min_agreement=min(spec.min_agreement, len(stored)),
        min_confidence=spec.min_confidence,
        max_per_class=spec.max_per_class,
        balance=spec.balance,
    )
    gold = {doc: r["gold"] for doc, r in pool.items() if "gold" in r}
    counts = Counter(p.label for p in accepted.values())
    labels = list(stored[0].meta.get("labels") or sorted(counts))
    about = {
        "pseudoLabels": float(len(accepted)),
        "pseudoLabelPool": float(len(pool)),
        **{f"pseudoLabels/{label}": float(counts[label]) for label in labels},
    }
    correct, compared = weak.accuracy({d: p.label for d, p in accepted.items()}, gold)
    if compared:
        about["pseudoLabelAccuracy"] = correct / compared
    weak_correct = weak_compared = 0
    for s in stored:
        c, n = weak.accuracy(s.weak, gold)
        weak_correct, weak_compared = weak_correct + c, weak_compared + n
    if weak_compared:
        about["weakLabelAccuracy"] = weak_correct / weak_compared
    return accepted, pool, about


def pseudo_labels(ctx: Context, keys: list[str]) -> tuple[list[str], list[str], dict[str, float]]:
    """The pool documents enough co-trained models agree on: texts (in the default view, the
    pool's text field), their labels, and metrics about them."""
    accepted, pool, about = combine_votes(ctx, keys)
    chosen = [doc for doc in pool if doc in accepted]  # pool order: the same on every rank
    if ctx.dist.is_main:
        log.info("pseudo-labels from %s: %s", ", ".join(keys), about)
    return [pool[d]["text"] for d in chosen], [accepted[d].label for d in chosen], about
