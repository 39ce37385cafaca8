"""``python -m ulmfit_trainer predict MODEL [TEXT ...]``: classify texts with an exported model.

MODEL is a classifier export (``<run>/model/`` or a classifier's ``final`` checkpoint: the
backbone in transformers layout, the head beside it) or, with ``--labels``, a bare causal LM
(an LM stage's ``final`` checkpoint) scored zero-shot by the generative head. Local directory or
``s3://bucket/prefix`` (credentials from ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``).

Texts come from the arguments, from ``--file`` (one per line) or from stdin (``-`` or no texts).
One JSON object per text on stdout: ``text``, ``label`` (a list for multi-label models),
``probabilities`` and, with ``--explain``, ``explanation``: the attention head's top tokens with
their weights. Exit status 2 for bad input (no model, ``--explain`` without an attention head).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

EXIT_BAD_INPUT = 2


class BadInput(Exception):
    """A usage error: reported on stderr, exit status 2."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ulmfit_trainer predict",
        description="Classify texts with an exported ULMFiT model; JSON lines on stdout.",
    )
    p.add_argument("model", help="model directory or s3:// URI")
    p.add_argument("texts", nargs="*", help="texts to classify ('-' or none: read stdin)")
    p.add_argument("--file", help="read texts from this file, one per line")
    p.add_argument("--explain", action="store_true", help="add the attention head's top tokens")
    p.add_argument("--top-k", type=int, default=5, help="tokens per explanation (default 5)")
    p.add_argument(
        "--highlight",
        choices=("auto", "always", "never"),
        default="auto",
        help="with --explain, print each text with its top tokens highlighted on stderr "
        "(auto: when stderr is a terminal)",
    )
    p.add_argument("--labels", help="zero-shot on a bare causal LM: comma-separated labels")
    p.add_argument(
        "--verbalizer",
        action="append",
        default=[],
        metavar="LABEL=TEXT",
        help="zero-shot: the text that stands for LABEL (default: the label itself)",
    )
    p.add_argument("--prompt", default=" Topic:", help="zero-shot: text between document and label")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's, or the run's)")
    p.add_argument("--s3-endpoint", default=os.environ.get("AWS_ENDPOINT_URL"))
    p.add_argument("--batch-size", type=int, default=16)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.top_k < 1:
            raise BadInput(f"--top-k must be at least 1 (got {args.top_k})")
        texts = list(read_texts(args.texts, args.file))
        return predict(args, texts)
    except BadInput as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT


def read_texts(arguments: list[str], file: str | None) -> Iterator[str]:
    """The arguments, then the file's lines, then stdin's (for '-', or when nothing else)."""
    yield from (text for text in arguments if text != "-")
    if file:
        try:
            lines = Path(file).read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise BadInput(f"cannot read --file {file}: {error.strerror}") from None
        yield from (line for line in lines if line.strip())
    if (not arguments and not file) or "-" in arguments:
        yield from (line.rstrip("\n") for line in sys.stdin if line.strip())


def local_model(uri: str, endpoint: str | None, workdir: Path) -> Path:
    if not uri.startswith("s3://"):
        path = Path(uri)
        if not (path / "config.json").exists():
            raise BadInput(f"{uri} is not a model directory (no config.json)")
        return path
    if not endpoint:
        raise BadInput("an s3:// model needs --s3-endpoint (or AWS_ENDPOINT_URL)")
    from ulmfit_trainer.config import S3Settings
    from ulmfit_trainer.store import fetch, split_s3_uri

    bucket, _ = split_s3_uri(uri)
    settings = S3Settings(endpoint=endpoint, bucket=bucket)
    return fetch(uri.rstrip("/"), workdir / "model", settings)


def find_tokenizer(model_dir: Path, given: str | None) -> Path:
    """The model's own tokenizer, else the run's (``<run>/<stage>/final`` ->
    ``<run>/tokenizer``)."""
    candidates = [Path(given)] if given else [model_dir, model_dir.parent.parent / "tokenizer"]
    for candidate in candidates:
        if (candidate / "tokenizer.json").exists() or (
            candidate / "tokenizer_config.json"
        ).exists():
            return candidate
    raise BadInput(f"no tokenizer in {' or '.join(map(str, candidates))}; give --tokenizer")


def load_model(args: argparse.Namespace, model_dir: Path, tokenizer: Any):
    from ulmfit_trainer.errors import InvalidSpec
    from ulmfit_trainer.models import (
        HEAD_SETTINGS,
        UlmfitClassifier,
        generative_settings,
        load_backbone,
    )

    if (model_dir / HEAD_SETTINGS).exists():
        return UlmfitClassifier.load(model_dir)
    if not args.labels:
        raise BadInput(
            f"{model_dir} has no classifier head ({HEAD_SETTINGS}); for zero-shot with a causal "
            "LM give --labels a,b,c"
        )
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    verbalizers = {}
    for item in args.verbalizer:
        label, sep, text = item.partition("=")
        if not sep or label not in labels:
            raise BadInput(f"--verbalizer {item!r}: expected LABEL=TEXT with LABEL in {labels}")
        verbalizers[label] = text
    backbone = load_backbone(model_dir)
    context = int(getattr(backbone.config, "n_positions", 0) or 0) or 512
    settings = generative_settings(
        tokenizer, labels, verbalizers, args.prompt, family="causal", max_length=context
    )
    try:
        return UlmfitClassifier(backbone, settings)
    except InvalidSpec as error:
        raise BadInput(str(error)) from None


def predict(args: argparse.Namespace, texts: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="ulmfit-predict-") as tmp:
        model_dir = local_model(args.model, args.s3_endpoint, Path(tmp))
        tokenizer_dir = find_tokenizer(model_dir, args.tokenizer)
        # Heavy imports only once the input is known to be good.
        import torch
        from transformers.utils import logging as hf_logging

        from ulmfit_trainer.config import HeadKind, LossKind
        from ulmfit_trainer.data import pad_batch
        from ulmfit_trainer.models import probabilities
        from ulmfit_trainer.tokenize import load_tokenizer

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        tokenizer = load_tokenizer(tokenizer_dir)
        model = load_model(args, model_dir, tokenizer)
        settings = model.settings
        if args.explain and settings.kind != HeadKind.ATTENTION:
            raise BadInput(
                f"--explain needs a model with the attention head; this one has the "
                f"{settings.head} head"
            )
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = model.to(device).eval()
        loss = LossKind(settings.loss)
        thresholds = settings.decision_thresholds()
        special = set(tokenizer.all_special_ids)
        highlight = args.explain and (
            args.highlight == "always" or (args.highlight == "auto" and sys.stderr.isatty())
        )
        force_colors = args.highlight == "always"
        for start in range(0, len(texts), args.batch_size):
            batch = texts[start : start + args.batch_size]
            ids = tokenizer(batch, truncation=True, max_length=settings.document_tokens)
            ids = ids["input_ids"]
            input_ids, mask = pad_batch(ids, tokenizer.pad_token_id)
            with torch.no_grad():
                out = model.predict(input_ids.to(device), mask.to(device))
            probs = probabilities(loss, out.logits.float()).cpu().tolist()
            for row, text in enumerate(batch):
                record = result(text, probs[row], settings.labels, settings.multi_label, thresholds)
                if args.explain and out.token_weights is not None:
                    weights = out.token_weights[row, : len(ids[row])].cpu().tolist()
                    top = top_tokens(ids[row], weights, special, args.top_k)
                    record["explanation"] = [
                        {"token": str(tokenizer.decode([token])).strip(), "weight": round(w, 6)}
                        for _, token, w in top
                    ]
                    if highlight:
                        positions = [i for i, _, _ in top]
                        show(tokenizer, text, settings.document_tokens, positions, force_colors)
                print(json.dumps(record, ensure_ascii=False), flush=True)
    return 0


def result(
    text: str, probs: list[float], labels: list[str], multi_label: bool, thresholds: list[float]
) -> dict[str, Any]:
    if multi_label:
        label: Any = [lab for lab, p, t in zip(labels, probs, thresholds, strict=True) if p >= t]
    else:
        label = labels[max(range(len(labels)), key=probs.__getitem__)]
    return {
        "text": text,
        "label": label,
        "probabilities": {lab: round(p, 6) for lab, p in zip(labels, probs, strict=True)},
    }


def top_tokens(
    ids: list[int], weights: list[float], special: set[int], k: int
) -> list[tuple[int, int, float]]:
    """(position, token id, weight) of the ``k`` heaviest tokens that are text, not markers."""
    ranked = sorted(
        ((i, token, w) for i, (token, w) in enumerate(zip(ids, weights, strict=True))
         if token not in special),
        key=lambda item: -item[2],
    )  # fmt: skip
    return ranked[:k]


def show(
    tokenizer: Any, text: str, max_length: int, positions: list[int], force: bool = False
) -> None:
    """The text on stderr with its top tokens highlighted (brightest = heaviest)."""
    from rich.console import Console
    from rich.text import Text

    encoded = tokenizer(text, truncation=True, max_length=max_length, return_offsets_mapping=True)
    offsets = encoded.get("offset_mapping")
    if offsets is None:
        return
    styled = Text(text)
    styles = ["bold black on yellow", "bold black on bright_yellow", "bold underline"]
    for rank, position in enumerate(positions):
        start, end = offsets[position]
        if end > start:
            styled.stylize(styles[min(rank, len(styles) - 1)], start, end)
    Console(stderr=True, highlight=False, force_terminal=force or None).print(styled)
