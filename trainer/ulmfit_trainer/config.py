"""What a stage receives: settings models shared by the job spec and the trainer.

The operator's ``api.py`` composes these same models into the ``ULMFiTJob`` spec, so a field is
described, defaulted and validated in exactly one place. No torch import here: the operator
imports this module.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from ulmfit_trainer.store import S3Settings


class WireModel(BaseModel):
    """camelCase on the wire (as in Kubernetes APIs), snake_case in Python; unknown keys fail."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
    )

    def to_wire(self) -> dict:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class StageName(StrEnum):
    PRETRAIN = "pretrain"
    FINETUNE = "finetune"
    CLASSIFIER = "classifier"
    EVALUATE = "evaluate"


class ModelFamily(StrEnum):
    CAUSAL = "causal"
    MASKED = "masked"


class DataSpec(WireModel):
    """Where the text comes from and which fields hold text and label."""

    dataset: str = "builtin://debian-packages"
    """The dataset: `builtin://NAME` (shipped with the trainer), `s3://bucket/key` or a directory.
    It holds `train`, `valid`, `test` and optionally `unlabeled` splits as `.jsonl` or
    `.jsonl.gz`, one JSON object per line."""
    text_field: str = "text"
    """JSON key that holds the document text."""
    label_field: str = "label"
    """JSON key that holds the label: a string (multi-class) or a list of strings (multi-label)."""
    max_train_examples: Annotated[int, Field(ge=1)] | None = None
    """Use at most this many labeled training examples (a fixed, seeded sample). Default: all."""
    max_unlabeled_examples: Annotated[int, Field(ge=1)] | None = None
    """Use at most this many unlabeled texts for language-model pretraining. Default: all."""
    max_eval_examples: Annotated[int, Field(ge=1)] | None = None
    """Use at most this many validation and test examples each. Default: all."""
    max_length: Annotated[int, Field(ge=8, le=8192)] = 128
    """Tokens per sequence (LM blocks and classifier inputs are cut to this length)."""


class ArchitectureSpec(WireModel):
    """A model built from scratch from a small transformers config (no weights downloaded)."""

    layers: Annotated[int, Field(ge=1, le=96)] = 4
    """Transformer blocks."""
    hidden_size: Annotated[int, Field(ge=8, le=16384)] = 256
    """Width of the hidden states."""
    heads: Annotated[int, Field(ge=1, le=128)] = 4
    """Attention heads; must divide `hiddenSize`."""
    context_length: Annotated[int, Field(ge=16, le=131072)] = 256
    """Maximum sequence length the position embeddings cover (tokens)."""
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    """Dropout inside the transformer blocks."""

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ArchitectureSpec:
        if self.hidden_size % self.heads:
            raise ValueError(
                f"hiddenSize {self.hidden_size} must be a multiple of heads {self.heads}"
            )
        return self


class ModelSpec(WireModel):
    """The backbone: a pretrained transformers model, or one built from `architecture`."""

    family: ModelFamily = ModelFamily.CAUSAL
    """`causal` (GPT-2 family, next-token LM) or `masked` (BERT family, masked-token LM)."""
    pretrained: str | None = None
    """A local path or `s3://` URI of a transformers model directory (`save_pretrained`
    layout). When empty, the model is built from `architecture` with random weights."""
    architecture: ArchitectureSpec = Field(default_factory=ArchitectureSpec)
    """Shape of a from-scratch model (ignored when `pretrained` is set)."""


class TokenizerSpec(WireModel):
    """The tokenizer: a pretrained one, or a byte-level BPE trained on the corpus."""

    pretrained: str | None = None
    """A local path or `s3://` URI of a tokenizer directory. When empty, a byte-level BPE is
    trained offline on the job's texts by the first LM stage and stored with the job."""
    vocab_size: Annotated[int, Field(ge=260, le=262144)] = 8000
    """Vocabulary size of a trained tokenizer (byte-level BPE needs at least 260)."""
    lowercase: bool = False
    """Lowercase text before a trained tokenizer sees it."""


class LMStageSpec(WireModel):
    """A language-model stage (pretraining or fine-tuning)."""

    enabled: bool = True
    """Run this stage. A disabled stage is skipped and the next one starts from the previous."""
    epochs: Annotated[float, Field(gt=0, le=1000)] = 1.0
    """Passes over the corpus (fractions allowed)."""
    max_steps: Annotated[int, Field(ge=1)] | None = None
    """Stop after this many optimizer steps, whatever `epochs` says."""
    learning_rate: Annotated[float, Field(gt=0, le=1.0)] = 1e-3
    """Peak learning rate of the top layer group (slanted triangular schedule)."""
    batch_size: Annotated[int, Field(ge=1, le=65536)] = 16
    """Sequences per optimizer step per process (micro batch x accumulation)."""
    micro_batch_size: Annotated[int, Field(ge=1, le=65536)] | None = None
    """Sequences per forward pass per process; defaults to `batchSize` (no accumulation)."""
    discriminative_factor: Annotated[float, Field(ge=1.0, le=100.0)] = 2.6
    """Each lower layer group trains at the rate of the group above divided by this factor
    (ULMFiT: 2.6). 1.0 turns discriminative rates off."""
    cut_frac: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1
    """Slanted triangular LR: fraction of steps spent warming up."""
    lr_ratio: Annotated[float, Field(ge=1.0, le=10000.0)] = 32.0
    """Slanted triangular LR: how much smaller the lowest rate is than the peak."""
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01
    """AdamW weight decay."""
    checkpoint_every: Annotated[int, Field(ge=1)] = 200
    """Save a resumable checkpoint every this many optimizer steps (and at the end)."""
    mask_probability: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.15
    """Masked LMs only: fraction of tokens to mask."""


class LossKind(StrEnum):
    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"


class ClassifierStageSpec(WireModel):
    """Classifier fine-tuning with gradual unfreezing on top of the fine-tuned LM."""

    epochs_per_phase: Annotated[float, Field(gt=0, le=1000)] = 1.0
    """Epochs trained in each unfreezing phase."""
    unfreeze_phases: Annotated[int, Field(ge=1, le=100)] | None = None
    """Number of phases: phase 1 trains the head only, each later phase unfreezes one more layer
    group from the top, the last phase trains everything. Default: head + one phase per layer
    group (every group unfrozen in the end)."""
    final_epochs: Annotated[float, Field(ge=0, le=1000)] = 2.0
    """Extra epochs once everything is unfrozen (ULMFiT trains the full model longest)."""
    learning_rate: Annotated[float, Field(gt=0, le=1.0)] = 2e-3
    """Peak learning rate of the head; lower groups get `lr / factor^depth`."""
    lr_decay_per_phase: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    """Each later phase's peak rate is the previous one's times this."""
    batch_size: Annotated[int, Field(ge=2, le=65536)] = 32
    """Documents per optimizer step per process (at least 2: the head uses batch norm)."""
    discriminative_factor: Annotated[float, Field(ge=1.0, le=100.0)] = 2.6
    """Layer-group rate divisor, as for the LM stages."""
    cut_frac: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1
    """Slanted triangular LR warm-up fraction, per phase."""
    lr_ratio: Annotated[float, Field(ge=1.0, le=10000.0)] = 32.0
    """Slanted triangular LR ratio, per phase."""
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01
    """AdamW weight decay."""
    head: Literal["concat"] = "concat"
    """Classifier head. `concat`: concat pooling of [last, max, mean] hidden states."""
    head_hidden_size: Annotated[int, Field(ge=1, le=65536)] = 128
    """Width of the head's hidden layer."""
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.2
    """Dropout in the head."""
    loss: LossKind | None = None
    """`softmax` (cross-entropy, one label per document) or `sigmoid` (binary cross-entropy per
    label: binary or multi-label). Default: sigmoid when labels are lists, else softmax."""
    label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    """Label smoothing for the loss (0 = off)."""


class StagesSpec(WireModel):
    """The pipeline: each ULMFiT stage and its hyperparameters."""

    pretrain: LMStageSpec = Field(default_factory=lambda: LMStageSpec(enabled=False))
    """LM pretraining on the unlabeled split (general domain). Off when the section is absent;
    writing the section turns it on unless it says `enabled: false`."""
    finetune: LMStageSpec = Field(default_factory=LMStageSpec)
    """LM fine-tuning on the target task's texts (labeled and unlabeled, labels unused)."""
    classifier: ClassifierStageSpec = Field(default_factory=ClassifierStageSpec)
    """Classifier fine-tuning with gradual unfreezing."""


class Precision(StrEnum):
    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class DeepSpeedSpec(WireModel):
    """DeepSpeed engine settings for every training stage."""

    zero_stage: Annotated[int, Field(ge=0, le=3)] = 2
    """ZeRO stage: 0 off, 1 optimizer states, 2 + gradients, 3 + parameters partitioned."""
    precision: Precision = Precision.AUTO
    """`auto`: bf16 on GPU, fp32 on CPU."""
    gradient_clipping: Annotated[float, Field(ge=0.0)] = 1.0
    """Clip the global gradient norm to this value (0 = off)."""


class StorageSpec(WireModel):
    """Where checkpoints, progress and the exported model live."""

    s3: S3Settings | None = None
    """An S3 bucket (MinIO, SeaweedFS, AWS). When empty, the local runner uses its workdir; the
    operator requires S3."""
    credentials_secret_ref: str | None = None
    """Name of a Secret in the job's namespace with keys `AWS_ACCESS_KEY_ID` and
    `AWS_SECRET_ACCESS_KEY`, given to pods as environment variables. Credentials never go in the
    spec itself."""
    keep_last: Annotated[int, Field(ge=1, le=1000)] = 2
    """Checkpoints kept per stage besides each stage's final one."""
    progress_interval_seconds: Annotated[float, Field(gt=0, le=3600)] = 5.0
    """How often rank 0 writes `progress.json`."""


class StageConfig(WireModel):
    """Everything one stage needs, written as JSON for `python -m ulmfit_trainer STAGE`."""

    stage: StageName
    """Which stage to run."""
    run: str
    """Run identity `<namespace>/<job>` under the store root: where this job's objects live."""
    store_root: str
    """Local directory or `s3://bucket/prefix` of the store."""
    s3: S3Settings | None = None
    """S3 connection when `storeRoot` is an `s3://` URI."""
    init_from: StageName | None = None
    """Stage whose final checkpoint initializes the weights (None: fresh or pretrained)."""
    data: DataSpec = Field(default_factory=DataSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec)
    lm: LMStageSpec | None = None
    """Hyperparameters of an LM stage."""
    classifier: ClassifierStageSpec | None = None
    """Hyperparameters of the classifier stage (also read by evaluate)."""
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    keep_last: int = 2
    progress_interval_seconds: float = 5.0
    seed: int = 42

    @model_validator(mode="after")
    def _has_its_hyperparameters(self) -> StageConfig:
        lm_stage = self.stage in (StageName.PRETRAIN, StageName.FINETUNE)
        if lm_stage and self.lm is None:
            raise ValueError(f"stage {self.stage} needs `lm` hyperparameters")
        if self.stage in (StageName.CLASSIFIER, StageName.EVALUATE) and self.classifier is None:
            raise ValueError(f"stage {self.stage} needs `classifier` hyperparameters")
        return self

    @classmethod
    def read(cls, path: str | Path) -> StageConfig:
        return cls.model_validate(json.loads(Path(path).read_text()))

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_wire(), indent=2, sort_keys=True) + "\n")
