"""The exported classifier as a transformers custom architecture (``trust_remote_code``).

``add_remote_code`` turns an export directory (backbone in transformers layout, the head's
weights and settings beside it, the tokenizer) into one that
``AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True)`` and
``pipeline("text-classification", model=dir, trust_remote_code=True)`` load: it copies this
package's ``configuration_ulmfit.py`` and ``modeling_ulmfit.py`` (self-contained: torch and
transformers only, no trainer import) next to the weights and adds ``auto_map``, the head's
settings and the problem type to ``config.json``. ``config.json`` keeps the backbone's
``model_type``, so plain ``AutoModel`` and ``ulmfit predict`` read the directory as before.

``model_card`` writes the directory's ``README.md`` from what the evaluate stage knows.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CONFIG_MODULE = "configuration_ulmfit"
MODEL_MODULE = "modeling_ulmfit"
AUTO_MAP = {
    "AutoConfig": f"{CONFIG_MODULE}.UlmfitConfig",
    "AutoModelForSequenceClassification": f"{MODEL_MODULE}.UlmfitForSequenceClassification",
}
# Heads the shipped module reproduces; the integration tests compare each with `ulmfit predict`.
SUPPORTED_HEADS = ("concat", "attention", "hierarchical", "generative")
MODEL_CARD = "README.md"


class UnsupportedHead(ValueError):
    """The shipped module has no counterpart of this classifier head."""


def template(name: str) -> str:
    """The source of one shipped module (package data of this package)."""
    return resources.files(__name__).joinpath(f"{name}.py").read_text(encoding="utf-8")


def truncation(tokenizer: Any, max_tokens: int) -> dict[str, int]:
    """How ``tokenizer(text, truncation=True, max_length=max_tokens)`` cuts a long document.

    The fast tokenizers cut the text's tokens and keep the special tokens the template frames it
    with; the exported model repeats that for a caller that did not truncate, so it needs to know
    how many of those closing tokens there are.
    """
    probe = "a b c"
    framed = list(tokenizer(probe)["input_ids"])
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    suffix = 0
    for start in range(len(framed) - len(plain) + 1):
        if framed[start : start + len(plain)] == plain:
            suffix = len(framed) - start - len(plain)
            break
    return {"max_tokens": int(max_tokens), "suffix_tokens": suffix}


def add_remote_code(directory: str | Path, head: dict[str, Any], cut: dict[str, int]) -> None:
    """Make ``directory`` loadable by the transformers auto classes with ``trust_remote_code``.

    ``head`` is the head's settings (``HeadSettings.__dict__``), ``cut`` what ``truncation``
    returned. Raises ``UnsupportedHead`` for a head the shipped module cannot run.
    """
    kind = head.get("head") or head.get("pooling")
    if kind not in SUPPORTED_HEADS:
        raise UnsupportedHead(f"no transformers module for the {kind!r} classifier head")
    directory = Path(directory)
    for name in (CONFIG_MODULE, MODEL_MODULE):
        (directory / f"{name}.py").write_text(template(name), encoding="utf-8")
    path = directory / "config.json"
    config = json.loads(path.read_text())
    labels = list(head["labels"])
    config.update(
        auto_map=AUTO_MAP,
        # config.json keeps the backbone's model_type (plain AutoModel reads it); the wrapper's
        # config class records it here when it takes the model_type over.
        ulmfit_backbone_type=config["model_type"],
        ulmfit_head={**head, "head": kind},
        ulmfit_truncation=cut,
        id2label={str(i): label for i, label in enumerate(labels)},
        label2id={label: i for i, label in enumerate(labels)},
        # The text-classification pipeline picks softmax or sigmoid from this.
        problem_type=(
            "multi_label_classification"
            if head.get("loss") == "sigmoid"
            else "single_label_classification"
        ),
    )
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- model card


@dataclass
class StageSummary:
    name: str
    settings: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class CardFacts:
    """What the model card says; gathered by the evaluate stage."""

    run: str
    dataset: str
    labels: list[str]
    multi_label: bool
    split_sizes: dict[str, int]
    backbone: dict[str, Any]
    head: dict[str, Any]
    stages: list[StageSummary]
    test_metrics: dict[str, float]
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)
    remote_code: bool = True
    remote_code_note: str = ""


def _table(rows: Sequence[tuple[str, Any]]) -> list[str]:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {key} | {_cell(value)} |" for key, value in rows]
    return lines


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = json.dumps(value) if isinstance(value, dict | list) else str(value)
    return text.replace("|", "\\|")


# The settings only one kind of head reads.
_HEAD_KEYS = {
    "attention": ("attention_heads",),
    "hierarchical": ("attention_heads", "window_overlap", "max_document_tokens"),
    "generative": ("prompt", "verbalizers"),
}


def model_card(facts: CardFacts) -> str:
    """The export's README.md: data, stages, metrics, backbone, use and limits."""
    f = facts
    head = f.head.get("head", "concat")
    loss = f.head.get("loss", "softmax")
    origin = f.backbone.get("origin", "")
    tuned = any(stage.name in ("pretrain", "finetune") for stage in f.stages)
    data_rows = [
        ("dataset", f.dataset),
        ("labels", ", ".join(f.labels)),
        ("multi-label", f.multi_label),
        *[(f"{split} examples", n) for split, n in f.split_sizes.items()],
    ]
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-classification",
        "tags: [ulmfit, text-classification, custom_code]",
        "---",
        "",
        f"# ULMFiT text classifier: {f.run}",
        "",
        f"A {'multi-label ' if f.multi_label else ''}text classifier trained by the ULMFiT "
        f"operator: a {f.backbone.get('model_type', '?')} model ({origin}), "
        + ("fine-tuned as a language model on the task's text, then " if tuned else "with ")
        + f"a `{head}` classifier head trained with gradual unfreezing.",
        "",
        "## Data",
        "",
        *_table(data_rows),
        "",
        "## Training stages",
        "",
    ]
    for stage in f.stages:
        lines.append(f"### {stage.name}")
        lines.append("")
        if stage.settings:
            lines += _table(sorted(stage.settings.items()))
            lines.append("")
        if stage.metrics:
            lines.append("Metrics: " + ", ".join(
                f"{key} {_cell(value)}" for key, value in sorted(stage.metrics.items())
            ) + ".")  # fmt: skip
            lines.append("")
    lines += ["## Test metrics", "", *_table(sorted(f.test_metrics.items())), ""]
    if f.per_class:
        lines += ["| label | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        for label, row in f.per_class.items():
            lines.append(
                f"| {label} | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1']:.3f} "
                f"| {int(row['support'])} |"
            )
        lines.append("")
    backbone_rows = [
        (key, f.backbone[key])
        for key in ("model_type", "hidden_size", "n_embd", "num_hidden_layers", "n_layer",
                    "num_attention_heads", "n_head", "vocab_size", "n_positions",
                    "max_position_embeddings")
        if key in f.backbone
    ]  # fmt: skip
    head_keys = ["head", "loss", "hidden_size", "dropout", "max_length",
                 *_HEAD_KEYS.get(head, ()), "thresholds"]  # fmt: skip
    head_rows = [(key, f.head[key]) for key in head_keys if f.head.get(key) not in (None, "", [])]
    lines += ["## Model", "", "Backbone:", "", *_table(backbone_rows), "", "Head:", "",
              *_table(head_rows), ""]  # fmt: skip
    lines += ["## How to use", ""]
    if f.remote_code:
        lines += [
            "```python",
            "from transformers import pipeline",
            "",
            'classify = pipeline("text-classification", model="PATH", trust_remote_code=True,',
            "                    top_k=None)",
            'classify("A daemon serving files over the network.")',
            "```",
            "",
            "`trust_remote_code=True` runs this directory's `modeling_ulmfit.py` and "
            "`configuration_ulmfit.py` (torch and transformers only). `AutoModel` without it "
            "loads the bare backbone. The same directory works with "
            "`ulmfit predict PATH TEXT ...`.",
            "",
        ]
    else:
        lines += [
            f"This head has no transformers module ({f.remote_code_note}); use "
            "`ulmfit predict PATH TEXT ...`. `AutoModel.from_pretrained(PATH)` loads the bare "
            "backbone.",
            "",
        ]
    document = f.head.get("max_document_tokens") if head == "hierarchical" else None
    lines += [
        "## Intended use and limits",
        "",
        f"Classifies text like the `{f.dataset}` data into the labels above"
        + (
            " (a label applies when its sigmoid probability reaches its threshold)."
            if loss == "sigmoid"
            else " (softmax over the labels: exactly one applies)."
        ),
        f"It reads the first {document or f.head.get('max_length')} tokens of a document"
        + (" in overlapping windows" if document else "")
        + "; anything after them is ignored. Texts unlike the training data, or other labels, "
        "are outside what it was tested on: check the test metrics above against your data. The "
        "probabilities come from a small, task-trained model and are only as calibrated as the "
        "expected calibration error says.",
        "",
    ]
    return "\n".join(lines)
