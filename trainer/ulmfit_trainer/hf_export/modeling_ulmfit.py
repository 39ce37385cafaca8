"""An exported ULMFiT classifier as a transformers sequence-classification model.

Shipped inside the exported model directory (``trust_remote_code``) and imported there by
transformers, so it depends on torch, safetensors and transformers only: it must not import the
trainer that wrote it. The heads mirror ``ulmfit_trainer.models`` module for module (the same
parameter names, so the exported ``classifier_head.safetensors`` loads as is); the trainer's tests
compare both on the same texts.

The backbone weights are the directory's ``model.safetensors`` (the bare encoder, keys without a
prefix: ``base_model_prefix`` maps them under ``backbone.``); the head weights are read from
``classifier_head.safetensors`` after ``from_pretrained`` has loaded the backbone.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from .configuration_ulmfit import UlmfitConfig

HEAD_WEIGHTS = "classifier_head.safetensors"


class ConcatPoolHead(nn.Module):
    """[last, max, mean] of the final hidden states -> BatchNorm -> MLP -> one logit per label."""

    def __init__(self, width: int, head: dict[str, Any]):
        super().__init__()
        self.norm = nn.BatchNorm1d(3 * width)
        self.hidden = nn.Linear(3 * width, head["hidden_size"])
        self.dropout = nn.Dropout(head["dropout"])
        self.out = nn.Linear(head["hidden_size"], len(head["labels"]))
        self.first_token = head["family"] == "masked"

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        if self.first_token:
            last = hidden[:, 0]
        else:
            index = attention_mask.sum(dim=1).clamp(min=1) - 1
            last = hidden[torch.arange(hidden.size(0), device=hidden.device), index]
        max_pool = hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).amax(dim=1)
        mean_pool = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        pooled = self.norm(torch.cat([last, max_pool, mean_pool], dim=-1))
        return self.out(self.dropout(F.gelu(self.hidden(pooled))))


class AttentionPoolHead(nn.Module):
    """Learned multi-head attention pooling over the tokens -> BatchNorm -> MLP -> logits."""

    def __init__(self, width: int, head: dict[str, Any]):
        super().__init__()
        heads = head["attention_heads"]
        self.score = nn.Sequential(
            nn.Linear(width, head["hidden_size"]),
            nn.Tanh(),
            nn.Linear(head["hidden_size"], heads),
        )
        self.norm = nn.BatchNorm1d(heads * width)
        self.hidden = nn.Linear(heads * width, head["hidden_size"])
        self.dropout = nn.Dropout(head["dropout"])
        self.out = nn.Linear(head["hidden_size"], len(head["labels"]))

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        scores = self.score(hidden).float()
        padding = (attention_mask == 0).unsqueeze(-1)
        weights = torch.softmax(scores.masked_fill(padding, float("-inf")), dim=1)
        weights = weights.masked_fill(padding, 0.0)
        pooled = torch.einsum("bth,btw->bhw", weights.to(hidden.dtype), hidden).flatten(1)
        return self.out(self.dropout(F.gelu(self.hidden(self.norm(pooled)))))


class WindowPoolHead(nn.Module):
    """Hierarchical head: per-window [mean, max] features, self-attention between the windows,
    a learned query pooling them -> MLP -> logits."""

    def __init__(self, width: int, head: dict[str, Any]):
        super().__init__()
        heads = head["attention_heads"]
        self.window_norm = nn.BatchNorm1d(2 * width)
        self.project = nn.Linear(2 * width, width)
        self.mix = nn.MultiheadAttention(width, heads, dropout=head["dropout"], batch_first=True)
        self.mix_norm = nn.LayerNorm(width)
        self.query = nn.Parameter(torch.zeros(1, 1, width))
        self.pool = nn.MultiheadAttention(width, heads, batch_first=True)
        self.hidden = nn.Linear(width, head["hidden_size"])
        self.dropout = nn.Dropout(head["dropout"])
        self.out = nn.Linear(head["hidden_size"], len(head["labels"]))

    @staticmethod
    def window_features(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        mean_pool = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        max_pool = hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).amax(dim=1)
        return torch.cat([mean_pool, max_pool], dim=-1)

    def forward(self, windows: torch.Tensor, window_mask: torch.Tensor) -> torch.Tensor:
        real = window_mask.bool()
        flat = torch.zeros_like(windows)
        flat[real] = self.window_norm(windows[real])
        x = self.project(flat)
        padding = ~real
        mixed, _ = self.mix(x, x, x, key_padding_mask=padding, need_weights=False)
        x = self.mix_norm(x + mixed)
        query = self.query.expand(windows.size(0), 1, -1)
        pooled, _ = self.pool(query, x, x, key_padding_mask=padding)
        return self.out(self.dropout(F.gelu(self.hidden(pooled.squeeze(1)))))


class GenerativeHead(nn.Module):
    """A label's logit: scale x mean log p(its verbalizer | document, prompt) + bias."""

    def __init__(self, head: dict[str, Any]):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(len(head["labels"])))
        self.scale = nn.Parameter(torch.ones(1))


def window_spans(length: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) windows of ``size`` tokens sharing ``overlap``; the last ends at the end."""
    if length <= size:
        return [(0, max(length, 1))]
    stride = size - overlap
    starts = [*range(0, length - size, stride), length - size]
    return [(start, start + size) for start in starts]


class UlmfitForSequenceClassification(PreTrainedModel):
    config_class = UlmfitConfig
    base_model_prefix = "backbone"
    # The head is not in model.safetensors; from_pretrained reads it from its own file.
    _keys_to_ignore_on_load_missing = [r"^head\."]  # noqa: RUF012 (transformers' own type)
    window_chunk = 64

    def __init__(self, config: UlmfitConfig):
        super().__init__(config)
        self.settings = dict(config.ulmfit_head)
        backbone_config = config.backbone_config()
        try:
            # BERT-like encoders carry a pooler the heads never use (and the trainer leaves out).
            self.backbone = AutoModel.from_config(backbone_config, add_pooling_layer=False)
        except TypeError:  # a backbone without one
            self.backbone = AutoModel.from_config(backbone_config)
        width = backbone_config.hidden_size
        kind = self.settings["head"]
        self.head: nn.Module
        if kind == "concat":
            self.head = ConcatPoolHead(width, self.settings)
        elif kind == "attention":
            self.head = AttentionPoolHead(width, self.settings)
        elif kind == "hierarchical":
            self.head = WindowPoolHead(width, self.settings)
        elif kind == "generative":
            self.head = GenerativeHead(self.settings)
        else:
            raise ValueError(f"unknown ULMFiT classifier head {kind!r}")
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # Every weight is loaded: the backbone from model.safetensors, the head from its file.
        return

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any):
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        path = _head_file(str(pretrained_model_name_or_path), kwargs)
        if path is not None:
            from safetensors.torch import load_file

            model.head.load_state_dict(load_file(path))
        model.eval()
        return model

    # -- input

    def _repack(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded rows cut as the trainer's tokenizer call cuts them.

        The heads pool "the last real token" at the row's length, so rows must be right-padded
        whatever side the caller padded on; documents longer than the trainer read are cut to
        its ``max_tokens`` keeping the tokenizer's closing special tokens, which is what
        ``truncation=True, max_length=max_tokens`` gives.
        """
        cut = self.config.ulmfit_truncation
        most = int(cut.get("max_tokens") or input_ids.size(1))
        suffix = int(cut.get("suffix_tokens") or 0)
        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            real = ids[mask.bool()]
            if len(real) > most:
                real = torch.cat([real[: most - suffix], real[len(real) - suffix :]])
            rows.append(real)
        width = max(1, max(len(r) for r in rows))
        ids_out = input_ids.new_zeros((len(rows), width))
        mask_out = attention_mask.new_zeros((len(rows), width))
        for i, real in enumerate(rows):
            ids_out[i, : len(real)] = real
            mask_out[i, : len(real)] = 1
        return ids_out, mask_out

    # -- forward

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput | tuple:
        # token_type_ids and the like are accepted and ignored: the trainer never passes them.
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        input_ids, attention_mask = self._repack(input_ids, attention_mask)
        kind = self.settings["head"]
        if kind == "hierarchical":
            logits = self._hierarchical(input_ids, attention_mask)
        elif kind == "generative":
            head: Any = self.head
            scores = self._verbalizer_log_probs(input_ids, attention_mask)
            logits = scores * head.scale + head.bias
        else:
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
            logits = self.head(hidden.last_hidden_state, attention_mask)
        loss = None if labels is None else self._loss(logits, labels)
        if return_dict is False:
            return (logits,) if loss is None else (loss, logits)
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.settings.get("loss") == "sigmoid":
            if labels.dim() == 1:
                labels = F.one_hot(labels.long(), logits.size(-1))
            return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        return F.cross_entropy(logits, labels.long())

    def _hierarchical(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        s = self.settings
        lengths = attention_mask.sum(dim=1).tolist()
        spans = [window_spans(int(n), s["max_length"], s["window_overlap"]) for n in lengths]
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
        return self.head(windows, window_mask)

    def _verbalizer_log_probs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """(documents, labels): mean log-probability of each label's verbalizer tokens after the
        document (its closing end token dropped, cut to fit the context) and the prompt."""
        s = self.settings
        config = self.backbone.config
        context = int(getattr(config, "n_positions", None) or config.max_position_embeddings)
        keep = context - len(s["prompt_ids"]) - max(len(v) for v in s["verbalizer_ids"])
        if keep < 1:
            raise ValueError("prompt and verbalizers leave no room for the document")
        device = input_ids.device
        rows: list[int] = []
        positions: list[int] = []
        tokens: list[int] = []
        sequences: list[list[int]] = []
        documents = 0
        for row, n in enumerate(attention_mask.sum(dim=1).tolist()):
            doc = input_ids[row, : int(n)].tolist()
            if doc and s.get("eos_id") is not None and doc[-1] == s["eos_id"]:
                doc = doc[:-1]
            context_ids = doc[:keep] + s["prompt_ids"]
            documents += 1
            for verbalizer in s["verbalizer_ids"]:
                for k, token in enumerate(verbalizer):
                    rows.append(len(sequences))
                    positions.append(len(context_ids) + k - 1)
                    tokens.append(token)
                sequences.append(context_ids + verbalizer)
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
        chosen = log_probs.gather(1, torch.as_tensor(tokens, device=device)[:, None]).squeeze(1)
        sums = torch.zeros(len(sequences), device=device).index_add(0, row_index, chosen)
        counts = torch.tensor([len(v) for v in s["verbalizer_ids"]], device=device)
        return (sums.view(documents, -1) / counts).to(hidden.dtype)


def _head_file(location: str, kwargs: dict[str, Any]) -> str | None:
    """The head's weights beside ``model.safetensors``: a local directory or a Hub repository.
    None when absent (a directory this class saved itself keeps the head in its own weights)."""
    subfolder = kwargs.get("subfolder") or ""
    if os.path.isdir(location):
        path = os.path.join(location, subfolder, HEAD_WEIGHTS)
        return path if os.path.isfile(path) else None
    from transformers.utils import cached_file

    hub = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only")
    return cached_file(
        location,
        HEAD_WEIGHTS,
        subfolder=subfolder,
        _raise_exceptions_for_missing_entries=False,
        **{k: kwargs[k] for k in hub if k in kwargs},
    )
