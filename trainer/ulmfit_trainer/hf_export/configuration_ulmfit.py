"""Configuration of an exported ULMFiT classifier, for ``trust_remote_code`` loading.

Shipped inside the exported model directory and imported there by transformers, so it depends on
transformers alone. ``config.json`` stays the backbone's own (``model_type`` gpt2, bert, ...) so
that plain ``AutoModel.from_pretrained`` keeps loading the bare encoder; this class reads the same
file, remembers the backbone's type and carries the classifier head's settings.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig

# Keys that describe this wrapper, not the backbone; left out when the backbone config is rebuilt.
_WRAPPER_KEYS = (
    "model_type", "auto_map", "architectures", "transformers_version",
    "ulmfit_backbone_type", "ulmfit_head", "ulmfit_truncation",
)  # fmt: skip


class UlmfitConfig(PretrainedConfig):
    model_type = "ulmfit"

    def __init__(
        self,
        ulmfit_backbone_type: str = "gpt2",
        ulmfit_head: dict[str, Any] | None = None,
        ulmfit_truncation: dict[str, int] | None = None,
        **kwargs: Any,
    ):
        self.ulmfit_backbone_type = ulmfit_backbone_type
        self.ulmfit_head = dict(ulmfit_head or {})
        # {"max_tokens": N, "suffix_tokens": K}: how the trainer's tokenizer call truncates.
        self.ulmfit_truncation = dict(ulmfit_truncation or {})
        super().__init__(**kwargs)

    @classmethod
    def get_config_dict(cls, *args: Any, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        config_dict, rest = super().get_config_dict(*args, **kwargs)
        # The file's model_type names the backbone (see the module docstring); keep it as the
        # backbone type rather than have transformers warn about a type mismatch on every load.
        found = config_dict.get("model_type")
        if found and found != cls.model_type:
            config_dict = {**config_dict, "model_type": cls.model_type}
            config_dict.setdefault("ulmfit_backbone_type", found)
        return config_dict, rest

    def backbone_config(self) -> PretrainedConfig:
        values = {k: v for k, v in self.to_dict().items() if k not in _WRAPPER_KEYS}
        return AutoConfig.for_model(self.ulmfit_backbone_type, **values)
