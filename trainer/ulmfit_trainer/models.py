"""Backbones through transformers, ULMFiT layer groups, the classifier heads and losses.

Two families: ``causal`` (GPT-2: next-token LM, pooled "last" = last real token) and ``masked``
(BERT: masked-token LM, pooled "last" = the first, CLS-like token). A model is either loaded from
a ``save_pretrained`` directory or built from an ``ArchitectureSpec`` with random weights.

One module of some 690 lines on purpose: it is one model, whose parts know each other (layer
groups split an LM or an ``UlmfitClassifier``, whose backbone is one; the classifier builds its
head from ``HeadSettings``, and its loss kind decides how logits become probabilities); a split
would only add imports back and forth between the parts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
)

from ulmfit_trainer.config import ArchitectureSpec, HeadKind, LossKind, ModelFamily
from ulmfit_trainer.errors import InvalidSpec

HEAD_WEIGHTS = "classifier_head.safetensors"
HEAD_SETTINGS = "classifier_head.json"

# Attribute names under which the supported backbones keep their embedding modules.
_EMBEDDING_NAMES = ("wte", "wpe", "embeddings", "embed_tokens", "embed_positions")


def family_of(model: nn.Module) -> ModelFamily:
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "model_type", "") in ("bert", "roberta"):
        return ModelFamily.MASKED
    return ModelFamily.CAUSAL


def build_lm(
    family: ModelFamily,
    architecture: ArchitectureSpec,
    vocab_size: int,
    special_ids: dict[str, int | None],
) -> PreTrainedModel:
    """A language model with random weights shaped by ``architecture``."""
    a = architecture
    if family == ModelFamily.CAUSAL:
        gpt2 = GPT2Config(
            vocab_size=vocab_size,
            n_positions=a.context_length,
            n_embd=a.hidden_size,
            n_layer=a.layers,
            n_head=a.heads,
            resid_pdrop=a.dropout,
            embd_pdrop=a.dropout,
            attn_pdrop=a.dropout,
            bos_token_id=special_ids.get("bos"),
            eos_token_id=special_ids.get("eos"),
            pad_token_id=special_ids.get("pad"),
        )
        return GPT2LMHeadModel(gpt2)
    bert = BertConfig(
        vocab_size=vocab_size,
        hidden_size=a.hidden_size,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        intermediate_size=4 * a.hidden_size,
        max_position_embeddings=a.context_length,
        hidden_dropout_prob=a.dropout,
        attention_probs_dropout_prob=a.dropout,
        type_vocab_size=1,
        bos_token_id=special_ids.get("bos"),
        eos_token_id=special_ids.get("eos"),
        pad_token_id=special_ids.get("pad"),
    )
    return BertForMaskedLM(bert)


@dataclass
class LoadedLM:
    """A language model read from a directory, and which of its parameters the directory lacked."""

    model: PreTrainedModel
    fresh: list[str]
    """Parameter names initialised at random (an encoder saved without its LM head, as
    sentence-embedding models are, gets a random head): what a head warm-up trains first."""


def load_lm(family: ModelFamily, directory: str | Path, vocab_size: int) -> LoadedLM:
    """A language model from a ``save_pretrained`` directory, its vocabulary fitted to ours."""
    auto = AutoModelForCausalLM if family == ModelFamily.CAUSAL else AutoModelForMaskedLM
    loaded: Any = auto.from_pretrained(str(directory), output_loading_info=True)
    model, info = loaded
    embeddings: Any = model.get_input_embeddings()
    if embeddings.num_embeddings < vocab_size:
        model.resize_token_embeddings(vocab_size)
    # A tied output bias is listed under both its names; named_parameters() gives each once.
    missing = set(info.get("missing_keys") or ())
    fresh = [name for name, _ in model.named_parameters() if name in missing]
    return LoadedLM(model, fresh)


def load_backbone(directory: str | Path) -> PreTrainedModel:
    """The bare encoder (no LM head) of a saved LM or exported classifier backbone."""
    config_path = Path(directory) / "config.json"
    model_type = json.loads(config_path.read_text()).get("model_type", "")
    # BERT's pooler is trained by next-sentence prediction we never run; the classifier pools
    # itself, so leave it out rather than carry randomly initialised weights.
    extra = {"add_pooling_layer": False} if model_type in ("bert", "roberta") else {}
    return AutoModel.from_pretrained(str(directory), **extra)


# --------------------------------------------------------------------------- layer groups


@dataclass
class LayerGroup:
    """One unit of discriminative rates and gradual unfreezing: named parameters."""

    name: str
    params: dict[str, nn.Parameter] = field(default_factory=dict)


def _blocks(base: nn.Module) -> tuple[str, nn.ModuleList]:
    """The stack of transformer blocks: the ModuleList as long as the layer count."""
    n_layers = getattr(base.config, "num_hidden_layers", None)
    for name, module in base.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return name, module
    raise ValueError(f"cannot find the transformer blocks of {type(base).__name__}")


def layer_groups(model: nn.Module) -> list[LayerGroup]:
    """Parameter groups bottom -> top: embeddings, one per block, then everything above.

    For an LM the top group is the final norm and the LM head; for an ``UlmfitClassifier`` it is
    the final norm and the classifier head. Tied weights (the GPT-2/BERT output projection *is*
    the input embedding) are listed once, in the embeddings group.
    """
    base: Any = model.backbone if isinstance(model, UlmfitClassifier) else model.base_model
    prefix = _prefix_of(model, base)
    blocks_name, blocks = _blocks(base)
    seen: set[int] = set()

    def collect(module: nn.Module, module_prefix: str, group: LayerGroup) -> None:
        for name, param in module.named_parameters(prefix=module_prefix):
            if id(param) not in seen:
                seen.add(id(param))
                group.params[name] = param

    embeddings = LayerGroup("embeddings")
    for name, module in base.named_children():
        if name in _EMBEDDING_NAMES:
            collect(module, f"{prefix}{name}", embeddings)
    groups = [embeddings]
    for i, block in enumerate(blocks):
        group = LayerGroup(f"block-{i}")
        collect(block, f"{prefix}{blocks_name}.{i}", group)
        groups.append(group)
    top = LayerGroup("head")
    collect(model, "", top)  # whatever is left: final norm, LM head or classifier head
    groups.append(top)
    return [g for g in groups if g.params]


def _prefix_of(model: nn.Module, base: nn.Module) -> str:
    if base is model:
        return ""
    for name, module in model.named_modules():
        if module is base:
            return f"{name}."
    raise ValueError("backbone is not a submodule of the model")


def set_trainable(groups: list[LayerGroup], n_top: int) -> None:
    """Train the top ``n_top`` groups, freeze the rest (gradual unfreezing)."""
    cut = len(groups) - n_top
    for i, group in enumerate(groups):
        for param in group.params.values():
            param.requires_grad_(i >= cut)


# --------------------------------------------------------------------------- classifier


@dataclass
class HeadSettings:
    """What it takes to rebuild the classifier head; stored beside the exported backbone."""

    labels: list[str]
    family: str = ModelFamily.CAUSAL.value
    hidden_size: int = 128
    dropout: float = 0.2
    loss: str = LossKind.SOFTMAX.value
    multi_label: bool = False
    pooling: str = "concat"  # exports before heads were selectable wrote this; same as `head`
    head: str = HeadKind.CONCAT.value
    max_length: int = 128
    """Tokens per input sequence (per window for the hierarchical head)."""
    attention_heads: int = 4
    window_overlap: int = 32
    max_document_tokens: int = 4096
    prompt: str = ""
    prompt_ids: list[int] = field(default_factory=list)
    verbalizers: list[str] = field(default_factory=list)
    """Generative head: each label's verbalizer text, in label order."""
    verbalizer_ids: list[list[int]] = field(default_factory=list)
    eos_id: int | None = None
    bos_id: int | None = None
    thresholds: list[float] | None = None
    """Sigmoid loss: each label's decision threshold (tuned on validation); None means 0.5."""

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> HeadSettings:
        values = json.loads(text)
        if "head" not in values and "pooling" in values:
            values["head"] = values["pooling"]
        return cls(**values)

    @property
    def kind(self) -> HeadKind:
        return HeadKind(self.head)

    @property
    def document_tokens(self) -> int:
        """Tokens read per document: whole windowed documents for the hierarchical head."""
        return self.max_document_tokens if self.kind == HeadKind.HIERARCHICAL else self.max_length

    def decision_thresholds(self) -> list[float]:
        return list(self.thresholds) if self.thresholds else [0.5] * len(self.labels)


@dataclass
class Prediction:
    """Logits and whatever explains them."""

    logits: torch.Tensor
    token_weights: torch.Tensor | None = None
    """Attention head: (documents, tokens) pooling weights; 1 in sum over real tokens."""
    window_weights: torch.Tensor | None = None
    """Hierarchical head: (documents, windows) weight of each window in the pooled vector."""
    windows: list[list[tuple[int, int]]] | None = None
    """Hierarchical head: the [start, end) token span of every window encoded, per document."""


class ConcatPoolHead(nn.Module):
    """ULMFiT's head: [last, max, mean] of the final hidden states -> MLP -> one logit per label."""

    def __init__(self, width: int, settings: HeadSettings):
        super().__init__()
        # Per-feature standardisation, as in ULMFiT's head: pooled LM features sit on very
        # different per-dimension offsets and scales (one max-pooled unit near 3 +- 0.01, a
        # mean-pooled one near 0 +- 0.5). LayerNorm normalises across features and leaves those
        # offsets in place - the head then barely fits the training set; BatchNorm removes them.
        self.norm = nn.BatchNorm1d(3 * width)
        self.hidden = nn.Linear(3 * width, settings.hidden_size)
        self.dropout = nn.Dropout(settings.dropout)
        self.out = nn.Linear(settings.hidden_size, len(settings.labels))
        self.first_token = settings.family == ModelFamily.MASKED.value

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        if self.first_token:
            last = hidden[:, 0]
        else:
            # Right padding: the last real token has seen the whole document.
            index = attention_mask.sum(dim=1).clamp(min=1) - 1
            last = hidden[torch.arange(hidden.size(0), device=hidden.device), index]
        max_pool = hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).amax(dim=1)
        mean_pool = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        pooled = self.norm(torch.cat([last, max_pool, mean_pool], dim=-1))
        return self.out(self.dropout(F.gelu(self.hidden(pooled))))


class AttentionPoolHead(nn.Module):
    """Learned attention pooling: each of ``attention_heads`` scores every token, a masked softmax
    turns the scores into weights, and the weighted sums feed an MLP. The weights (averaged over
    the heads) say which tokens the prediction rests on."""

    def __init__(self, width: int, settings: HeadSettings):
        super().__init__()
        heads = settings.attention_heads
        self.score = nn.Sequential(
            nn.Linear(width, settings.hidden_size),
            nn.Tanh(),
            nn.Linear(settings.hidden_size, heads),
        )
        self.norm = nn.BatchNorm1d(heads * width)  # same reason as in ConcatPoolHead
        self.hidden = nn.Linear(heads * width, settings.hidden_size)
        self.dropout = nn.Dropout(settings.dropout)
        self.out = nn.Linear(settings.hidden_size, len(settings.labels))

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.score(hidden).float()  # (B, T, heads)
        padding = (attention_mask == 0).unsqueeze(-1)
        weights = torch.softmax(scores.masked_fill(padding, float("-inf")), dim=1)
        weights = weights.masked_fill(padding, 0.0)  # a fully padded row gives 0, not NaN
        pooled = torch.einsum("bth,btw->bhw", weights.to(hidden.dtype), hidden).flatten(1)
        logits = self.out(self.dropout(F.gelu(self.hidden(self.norm(pooled)))))
        return logits, weights.mean(dim=-1)


class WindowPoolHead(nn.Module):
    """Hierarchical head: window vectors (mean and max of each window's hidden states) attend to
    each other (multi-head self-attention), then a learned query pools them (multi-head
    attention again) into one document vector -> MLP -> logits."""

    def __init__(self, width: int, settings: HeadSettings):
        super().__init__()
        if width % settings.attention_heads:
            raise InvalidSpec([(
                "stages.classifier.attentionHeads", settings.attention_heads,
                f"must divide the model's hidden size {width} for the hierarchical head",
            )])  # fmt: skip
        heads = settings.attention_heads
        self.window_norm = nn.BatchNorm1d(2 * width)
        self.project = nn.Linear(2 * width, width)
        self.mix = nn.MultiheadAttention(width, heads, dropout=settings.dropout, batch_first=True)
        self.mix_norm = nn.LayerNorm(width)
        self.query = nn.Parameter(torch.randn(1, 1, width) * width**-0.5)
        self.pool = nn.MultiheadAttention(width, heads, batch_first=True)
        self.hidden = nn.Linear(width, settings.hidden_size)
        self.dropout = nn.Dropout(settings.dropout)
        self.out = nn.Linear(settings.hidden_size, len(settings.labels))

    @staticmethod
    def window_features(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        mean_pool = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        max_pool = hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).amax(dim=1)
        return torch.cat([mean_pool, max_pool], dim=-1)

    def forward(
        self, windows: torch.Tensor, window_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``windows``: (documents, most windows, 2 x width) features; ``window_mask``: 1 where a
        window exists. Returns logits and each window's pooling weight."""
        b = windows.size(0)
        real = window_mask.bool()
        flat = torch.zeros_like(windows)
        flat[real] = self.window_norm(windows[real])
        x = self.project(flat)
        padding = ~real
        mixed, _ = self.mix(x, x, x, key_padding_mask=padding, need_weights=False)
        x = self.mix_norm(x + mixed)
        query = self.query.expand(b, 1, -1)
        pooled, weights = self.pool(query, x, x, key_padding_mask=padding)
        logits = self.out(self.dropout(F.gelu(self.hidden(pooled.squeeze(1)))))
        return logits, weights.squeeze(1)


class GenerativeHead(nn.Module):
    """Scores each label by how likely the causal LM finds its verbalizer after document + prompt.

    A label's logit is ``scale * mean log p(verbalizer tokens | document, prompt) + bias``. The
    bias starts at minus the label's typical score (``UlmfitClassifier.calibrate``): the logit
    then measures how much the document raises the label's likelihood, so a label whose word is
    common in general does not win every document. Zero-shot ready before any training; the
    bias and scale (and, once unfrozen, the LM) then train by cross-entropy over the labels.
    """

    def __init__(self, settings: HeadSettings):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(len(settings.labels)))
        self.scale = nn.Parameter(torch.ones(1))


def window_spans(length: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) spans of ``size`` tokens, consecutive ones sharing ``overlap``, covering all
    ``length`` tokens; the last window ends at the document's end (no stub windows)."""
    if size <= overlap:
        raise ValueError(f"window size {size} must exceed the overlap {overlap}")
    if length <= size:
        return [(0, max(length, 1))]
    stride = size - overlap
    starts = [*range(0, length - size, stride), length - size]
    return [(start, start + size) for start in starts]


class UlmfitClassifier(nn.Module):
    """A transformers encoder with a classifier head (``settings.head``); ``forward`` returns
    logits, ``predict`` returns them with the head's explanation."""

    # Windows encoded per backbone call by the hierarchical head (bounds activation memory).
    window_chunk = 64

    def __init__(self, backbone: PreTrainedModel, settings: HeadSettings, *, calibrate=True):
        super().__init__()
        self.backbone = backbone
        self.settings = settings
        width = backbone.config.hidden_size
        kind = settings.kind
        self.head: nn.Module
        if kind == HeadKind.CONCAT:
            self.head = ConcatPoolHead(width, settings)
        elif kind == HeadKind.ATTENTION:
            self.head = AttentionPoolHead(width, settings)
        elif kind == HeadKind.HIERARCHICAL:
            self.head = WindowPoolHead(width, settings)
        else:
            self._check_generative()
            self.head = GenerativeHead(settings)
            if calibrate:
                self.calibrate()

    # -- forward

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.predict(input_ids, attention_mask).logits

    def predict(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Prediction:
        kind = self.settings.kind
        if kind == HeadKind.HIERARCHICAL:
            return self._hierarchical(input_ids, attention_mask)
        if kind == HeadKind.GENERATIVE:
            scores = self.verbalizer_log_probs(input_ids, attention_mask)
            head: Any = self.head
            return Prediction(scores * head.scale + head.bias)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        if kind == HeadKind.ATTENTION:
            logits, weights = self.head(hidden.last_hidden_state, attention_mask)
            return Prediction(logits, token_weights=weights)
        return Prediction(self.head(hidden.last_hidden_state, attention_mask))

    def _hierarchical(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Prediction:
        s = self.settings
        lengths = attention_mask.sum(dim=1).tolist()
        spans = [window_spans(int(n), s.max_length, s.window_overlap) for n in lengths]
        pieces = [input_ids[row, a:b] for row, doc in enumerate(spans) for a, b in doc]
        width = max(len(p) for p in pieces)
        ids = input_ids.new_zeros((len(pieces), width))
        mask = attention_mask.new_zeros((len(pieces), width))
        for i, piece in enumerate(pieces):
            ids[i, : len(piece)] = piece
            mask[i, : len(piece)] = 1
        features = []
        for i in range(0, len(pieces), self.window_chunk):
            part = slice(i, i + self.window_chunk)
            hidden = self.backbone(input_ids=ids[part], attention_mask=mask[part])
            features.append(WindowPoolHead.window_features(hidden.last_hidden_state, mask[part]))
        flat = torch.cat(features)
        most = max(len(doc) for doc in spans)
        windows = flat.new_zeros((len(spans), most, flat.size(-1)))
        window_mask = attention_mask.new_zeros((len(spans), most))
        at = 0
        for row, doc in enumerate(spans):
            windows[row, : len(doc)] = flat[at : at + len(doc)]
            window_mask[row, : len(doc)] = 1
            at += len(doc)
        logits, weights = self.head(windows, window_mask)
        return Prediction(logits, window_weights=weights, windows=spans)

    # -- generative head

    def _check_generative(self) -> None:
        s = self.settings
        if s.family != ModelFamily.CAUSAL.value or family_of(self.backbone) != ModelFamily.CAUSAL:
            raise InvalidSpec([(
                "stages.classifier.head", s.head,
                "the generative head needs a causal LM (model.family: causal)",
            )])  # fmt: skip
        if not getattr(self.backbone.config, "tie_word_embeddings", True):
            raise InvalidSpec([(
                "stages.classifier.head", s.head,
                "the generative head reads the LM's output projection from its input embeddings; "
                "this model does not tie them",
            )])  # fmt: skip
        if len(s.verbalizer_ids) != len(s.labels) or not all(s.verbalizer_ids):
            raise InvalidSpec([(
                "stages.classifier.verbalizers", s.verbalizers,
                "every label needs a verbalizer of at least one token",
            )])  # fmt: skip

    def _context_length(self) -> int:
        config = self.backbone.config
        return int(getattr(config, "n_positions", None) or config.max_position_embeddings)

    def verbalizer_log_probs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """(documents, labels): mean log-probability of each label's verbalizer tokens after the
        document (its closing </s> dropped, cut to fit the context) and the prompt."""
        s = self.settings
        longest = max(len(v) for v in s.verbalizer_ids)
        keep = self._context_length() - len(s.prompt_ids) - longest
        if keep < 1:
            raise InvalidSpec([(
                "stages.classifier.prompt", s.prompt,
                "prompt and verbalizers leave no room for the document in the model's context",
            )])  # fmt: skip
        documents = []
        for row, n in enumerate(attention_mask.sum(dim=1).tolist()):
            doc = input_ids[row, : int(n)].tolist()
            if doc and s.eos_id is not None and doc[-1] == s.eos_id:
                doc = doc[:-1]
            documents.append(doc[:keep])
        return self._continuation_log_probs(documents, input_ids.device)

    def _continuation_log_probs(
        self, documents: list[list[int]], device: torch.device
    ) -> torch.Tensor:
        s = self.settings
        sequences: list[list[int]] = []
        rows: list[int] = []
        positions: list[int] = []
        tokens: list[int] = []
        for doc in documents:
            context = doc + s.prompt_ids
            for verbalizer in s.verbalizer_ids:
                sequence = len(sequences)
                # Position p predicts token p + 1: the verbalizer's tokens are predicted from
                # the positions just before them.
                for k, token in enumerate(verbalizer):
                    rows.append(sequence)
                    positions.append(len(context) + k - 1)
                    tokens.append(token)
                sequences.append(context + verbalizer)
        width = max(len(x) for x in sequences)
        ids = torch.zeros((len(sequences), width), dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, seq in enumerate(sequences):
            ids[i, : len(seq)] = torch.as_tensor(seq, device=device)
            mask[i, : len(seq)] = 1
        hidden = self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        row_index = torch.as_tensor(rows, device=device)
        picked = hidden[row_index, torch.as_tensor(positions, device=device)]
        vocabulary: Any = self.backbone.get_input_embeddings()
        log_probs = torch.log_softmax((picked @ vocabulary.weight.T).float(), dim=-1)
        token_log_probs = log_probs.gather(1, torch.as_tensor(tokens, device=device)[:, None])
        sums = torch.zeros(len(sequences), device=device).index_add(
            0, row_index, token_log_probs.squeeze(1)
        )
        counts = torch.tensor([len(v) for v in s.verbalizer_ids], device=device)
        return (sums.view(len(documents), -1) / counts).to(hidden.dtype)

    @torch.no_grad()
    def calibrate(self, documents: Sequence[Sequence[int]] = (), pad_id: int = 0) -> None:
        """Set the generative head's bias to minus each label's typical score, so that a label
        wins by what the document adds, not by how common its verbalizer is.

        With ``documents`` (token ids of unlabeled in-domain texts) the typical score is the
        mean over them (batch calibration); without, the verbalizer's log-probability after the
        prompt alone (pointwise mutual information). No labels are used either way.
        """
        was_training = self.training
        self.eval()
        device = next(self.backbone.parameters()).device
        if documents:
            scores = []
            for i in range(0, len(documents), 32):
                chunk = documents[i : i + 32]
                width = max(len(d) for d in chunk)
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long, device=device)
                mask = torch.zeros_like(ids)
                for row, doc in enumerate(chunk):
                    ids[row, : len(doc)] = torch.as_tensor(doc, device=device)
                    mask[row, : len(doc)] = 1
                scores.append(self.verbalizer_log_probs(ids, mask))
            typical = torch.cat(scores).mean(dim=0)
        else:
            start = [self.settings.bos_id] if self.settings.bos_id is not None else []
            typical = self._continuation_log_probs([start], device)[0]
        head: Any = self.head
        head.bias.copy_(-typical.to(head.bias.dtype))
        self.train(was_training)

    # -- export

    def save(
        self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Export: the backbone in plain transformers layout, the head beside it.

        ``state_dict`` (this module's keys) overrides the live weights - under ZeRO-3 only the
        engine's gathered copy is whole.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        state = state_dict if state_dict is not None else self.state_dict()
        labels = self.settings.labels
        self.backbone.config.id2label = dict(enumerate(labels))
        self.backbone.config.label2id = {label: i for i, label in enumerate(labels)}
        backbone = {
            k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")
        }
        self.backbone.save_pretrained(str(directory), state_dict=backbone)
        head = {
            k.removeprefix("head."): v.detach().contiguous().cpu()
            for k, v in state.items()
            if k.startswith("head.")
        }
        save_file(head, str(directory / HEAD_WEIGHTS))
        (directory / HEAD_SETTINGS).write_text(self.settings.to_json())

    @classmethod
    def load(cls, directory: str | Path) -> UlmfitClassifier:
        from safetensors.torch import load_file

        directory = Path(directory)
        settings = HeadSettings.from_json((directory / HEAD_SETTINGS).read_text())
        model = cls(load_backbone(directory), settings, calibrate=False)
        model.head.load_state_dict(load_file(str(directory / HEAD_WEIGHTS)))
        return model


def generative_settings(
    tokenizer: Any,
    labels: list[str],
    verbalizers: dict[str, str],
    prompt: str,
    **settings: Any,
) -> HeadSettings:
    """HeadSettings of a generative head: prompt and each label's verbalizer as token ids.

    A verbalizer gets a leading space when neither it nor the prompt supplies one, so that it is
    tokenized as the word it is (byte-level BPE marks word starts by the space).
    """
    texts = []
    for label in labels:
        text = verbalizers.get(label, label)
        if not text[:1].isspace() and not prompt[-1:].isspace():
            text = " " + text
        texts.append(text)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return HeadSettings(
        labels=labels,
        head=HeadKind.GENERATIVE.value,
        prompt=prompt,
        prompt_ids=encode(prompt),
        verbalizers=texts,
        verbalizer_ids=[encode(text) for text in texts],
        eos_id=tokenizer.eos_token_id,
        bos_id=tokenizer.bos_token_id,
        **settings,
    )


# --------------------------------------------------------------------------- losses


def default_loss(multi_label: bool, requested: LossKind | None) -> LossKind:
    """Sigmoid for list labels (several may hold at once), softmax for one label per document."""
    if requested is not None:
        return requested
    return LossKind.SIGMOID if multi_label else LossKind.SOFTMAX


def classification_loss(
    kind: LossKind,
    logits: torch.Tensor,
    targets: torch.Tensor,
    label_smoothing: float = 0.0,
    *,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean loss. ``targets``: class indices (softmax) or, for sigmoid, indices or multi-hot.

    Softmax: cross-entropy against ``(1 - s) * one_hot + s / classes``; with ``class_weights``
    each document's loss counts by its class's weight (a weighted mean). Sigmoid: binary
    cross-entropy per (document, label) against targets pulled toward 0.5 by ``s``; with
    ``class_weights`` each label's column is scaled by its weight before the mean.
    """
    logits = logits.float()
    n_classes = logits.size(-1)
    if kind == LossKind.SOFTMAX:
        if targets.dim() > 1:
            raise ValueError("softmax loss needs one label per document; use the sigmoid loss")
        log_probs = torch.log_softmax(logits, dim=-1)
        soft = F.one_hot(targets, n_classes).float() * (1.0 - label_smoothing)
        soft = soft + label_smoothing / n_classes
        per_document = -(soft * log_probs).sum(dim=-1)
        if class_weights is None:
            return per_document.mean()
        weights = class_weights.to(logits.device, logits.dtype)[targets]
        return (per_document * weights).sum() / weights.sum()
    if targets.dim() == 1:
        targets = F.one_hot(targets, n_classes)
    targets = targets.to(logits.dtype)
    if label_smoothing:
        # Pull each binary target toward 0.5, the sigmoid analogue of spreading mass evenly.
        targets = targets * (1.0 - label_smoothing) + 0.5 * label_smoothing
    per_label = -(targets * F.logsigmoid(logits) + (1.0 - targets) * F.logsigmoid(-logits))
    if class_weights is not None:
        per_label = per_label * class_weights.to(logits.device, logits.dtype)
    return per_label.mean()


def probabilities(kind: LossKind, logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits, dim=-1) if kind == LossKind.SOFTMAX else torch.sigmoid(logits)
