"""Backbones through transformers, ULMFiT layer groups, the concat-pooling classifier and losses.

Two families: ``causal`` (GPT-2: next-token LM, pooled "last" = last real token) and ``masked``
(BERT: masked-token LM, pooled "last" = the first, CLS-like token). A model is either loaded from
a ``save_pretrained`` directory or built from an ``ArchitectureSpec`` with random weights.
"""

from __future__ import annotations

import json
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

from ulmfit_trainer.config import ArchitectureSpec, LossKind, ModelFamily

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


def load_lm(family: ModelFamily, directory: str | Path, vocab_size: int) -> PreTrainedModel:
    """A language model from a ``save_pretrained`` directory, its vocabulary fitted to ours."""
    auto = AutoModelForCausalLM if family == ModelFamily.CAUSAL else AutoModelForMaskedLM
    model = auto.from_pretrained(str(directory))
    embeddings: Any = model.get_input_embeddings()
    if embeddings.num_embeddings < vocab_size:
        model.resize_token_embeddings(vocab_size)
    return model


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
    pooling: str = "concat"  # [last, max, mean]

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> HeadSettings:
        return cls(**json.loads(text))


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


class UlmfitClassifier(nn.Module):
    """A transformers encoder with a concat-pooling head; ``forward`` returns logits."""

    def __init__(self, backbone: PreTrainedModel, settings: HeadSettings):
        super().__init__()
        self.backbone = backbone
        self.settings = settings
        self.head = ConcatPoolHead(backbone.config.hidden_size, settings)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        return self.head(hidden.last_hidden_state, attention_mask)

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
        model = cls(load_backbone(directory), settings)
        model.head.load_state_dict(load_file(str(directory / HEAD_WEIGHTS)))
        return model


# --------------------------------------------------------------------------- losses


def default_loss(multi_label: bool, requested: LossKind | None) -> LossKind:
    """Sigmoid for list labels (several may hold at once), softmax for one label per document."""
    if requested is not None:
        return requested
    return LossKind.SIGMOID if multi_label else LossKind.SOFTMAX


def classification_loss(
    kind: LossKind, logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean loss. ``targets``: class indices (softmax) or, for sigmoid, indices or multi-hot."""
    if kind == LossKind.SOFTMAX:
        if targets.dim() > 1:
            raise ValueError("softmax loss needs one label per document; use the sigmoid loss")
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    if targets.dim() == 1:
        targets = F.one_hot(targets, logits.size(-1))
    targets = targets.to(logits.dtype)
    if label_smoothing:
        # Pull each binary target toward 0.5, the sigmoid analogue of spreading mass evenly.
        targets = targets * (1.0 - label_smoothing) + 0.5 * label_smoothing
    return F.binary_cross_entropy_with_logits(logits, targets)


def probabilities(kind: LossKind, logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits, dim=-1) if kind == LossKind.SOFTMAX else torch.sigmoid(logits)
