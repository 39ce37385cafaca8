"""What a stage receives: settings models shared by the job spec and the trainer.

Here live the store connection (`S3Settings`, `is_store_key`), every stage's spec (data, model,
tokenizer, LM, classifier, co-training, sweep, DeepSpeed, storage) and `StageConfig`, the one
document a stage process reads. The operator's ``api.py`` composes these same models into the
``ULMFiTJob`` spec, so a field is described, defaulted and validated in exactly one place. No
torch import here: the operator imports this module.

One module of some 650 lines on purpose: it is the job spec's vocabulary, flat declarations that
refer to each other (a stage spec names kinds, domains and other specs), from which (through
``api.py``) the CRD and the README reference are generated; split, one spec would be read across
several files.
"""

from __future__ import annotations

import json
import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel


def is_store_key(key: str) -> bool:
    """A store key is a relative POSIX path: no empty, `.` or `..` segments, no backslashes."""
    return not (
        not key
        or key.startswith("/")
        or "\\" in key
        or "\x00" in key
        or any(part in ("", ".", "..") for part in key.split("/"))
    )


BUCKET_NAME = r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"
"""An S3 bucket name: 3 to 63 lowercase letters, digits, dots and hyphens."""

S3_OBJECT_URI = rf"^s3://{BUCKET_NAME}/+[^/]"
"""An `s3://` URI that names a bucket and a key under it (`s3://bucket/key`). The same regex
is a CEL rule in the CRD (RE2 and Python agree on it), so keep it to plain classes."""

S3_URI_SHAPE = (
    "is not an s3://bucket/key URI: it needs a bucket name (3-63 lowercase letters, digits, dots,"
    " hyphens) and a key under it"
)
"""What `s3_uri_problem` says after the field and its value (the CRD's rule says the same)."""

BLANK = r"^[ \t\n\r\f]*$"
"""Empty or only whitespace (RE2 and Python agree on this class)."""


BUILTIN_BACKBONE = r"builtin://[a-z0-9][a-z0-9._-]*"
"""`builtin://NAME`: a backbone shipped in an installed Python package (listed in `backbones`)."""

HF_REPO = r"hf://([A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?"
"""`hf://[ORG/]NAME[@REVISION]`: a Hugging Face Hub repository, resolved through its cache."""

PRETRAINED_URI = rf"^(file://.*|{BUILTIN_BACKBONE}|{HF_REPO})$"
"""The non-S3 URIs `pretrained` accepts (a value without `://` is a directory). Shared with the
CRD's CEL rule, so plain classes only."""

PRETRAINED_SHAPE = (
    "is not an s3://bucket/key URI (a bucket name of 3-63 lowercase letters, digits, dots,"
    " hyphens and a key under it), builtin://NAME, hf://[ORG/]NAME[@REVISION], file:// URI or"
    " directory"
)
"""What `pretrained_problem` says after the field and its value (the CRD's rule says the same):
one sentence for every malformed form, so the CEL rule and the validator stay one pair."""


def pretrained_problem(field: str, value: str) -> str | None:
    """Why `value` (of a `pretrained` field) names no model or tokenizer the trainer can resolve
    (a malformed `s3://`, `builtin://` or `hf://` URI, another scheme), or None when it is fine."""
    if value.startswith("s3://"):
        fine = bool(re.search(S3_OBJECT_URI, value))
    elif "://" in value:
        # Python's `$` also matches before a final newline; RE2's (the CRD's) does not.
        fine = bool(re.search(PRETRAINED_URI, value)) and not value.endswith("\n")
    else:
        fine = True
    return None if fine else f"{field} '{value}' {PRETRAINED_SHAPE}"


def s3_uri_problem(field: str, value: str) -> str | None:
    """Why `value` (of `field`) is an `s3://` URI that cannot be fetched (`s3://`, `s3:///key`,
    a bad bucket name, a whole bucket), or None when it is fine or not an `s3://` URI at all."""
    if value.startswith("s3://") and not re.search(S3_OBJECT_URI, value):
        return f"{field} '{value}' {S3_URI_SHAPE}"
    return None


class S3Settings(BaseModel):
    """Connection to an S3-compatible object store (MinIO, SeaweedFS, AWS S3).

    Credentials never appear here: they are read from environment variables (in a cluster, a
    Secret mounted with `envFrom`); the fields below only name those variables.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
        frozen=True,
    )

    endpoint: Annotated[str, Field(min_length=1)]
    """S3 API endpoint: `host:port`, or a URL `http://host:port` / `https://host`. The scheme
    decides TLS unless `secure` is set."""
    bucket: Annotated[str, Field(pattern=rf"^{BUCKET_NAME}$")]
    """Bucket that holds every job's objects."""
    prefix: str = "ulmfit"
    """Key prefix inside the bucket; a job lives under `<prefix>/<namespace>/<job>/<uid>/`."""
    region: str | None = None
    """Region of the bucket. Default: asked from the server once per bucket."""
    secure: bool | None = None
    """Use TLS. Default: true for an `https://` endpoint, false otherwise."""
    verify_tls: bool = True
    """Verify the server's TLS certificate (CA bundle from `SSL_CERT_FILE`, else certifi)."""
    access_key_env: str = "AWS_ACCESS_KEY_ID"
    """Environment variable that holds the access key."""
    secret_key_env: str = "AWS_SECRET_ACCESS_KEY"
    """Environment variable that holds the secret key."""
    session_token_env: str = "AWS_SESSION_TOKEN"
    """Environment variable that holds a session token, used only when set."""
    create_bucket: bool = True
    """Create the bucket on the first write when it does not exist."""
    part_size_mb: Annotated[int, Field(ge=5, le=5120)] = 8
    """Multipart upload part size in MiB (S3 allows 5 MiB to 5 GiB); larger files are sent in
    parts of this size. Memory used by an upload is about `parallelUploads * partSizeMb` MiB per
    file in flight (its part buffers, reused)."""
    parallel_uploads: Annotated[int, Field(ge=1, le=64)] = 4
    """Parts of one file uploaded concurrently."""
    parallel_files: Annotated[int, Field(ge=1, le=16)] = 2
    """Files of one checkpoint transferred concurrently."""
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 6
    """Tries per operation on connection errors and 5xx answers before giving up."""
    retry_base_delay: Annotated[float, Field(gt=0, le=600)] = 0.5
    """Seconds before the first retry; doubles each retry (with jitter) up to `retryMaxDelay`."""
    retry_max_delay: Annotated[float, Field(gt=0, le=3600)] = 30.0
    """Upper bound in seconds of one wait between retries."""
    timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = 60.0
    """Seconds to wait for a connection or for the next bytes of an answer."""

    @field_validator("endpoint")
    @classmethod
    def _endpoint_shape(cls, value: str) -> str:
        value = value.strip()
        parts = urlsplit(value if "://" in value else f"//{value}")
        if "://" in value and parts.scheme not in ("http", "https"):
            raise ValueError(f"endpoint scheme must be http or https, not {parts.scheme!r}")
        if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("endpoint must be host[:port] or http(s)://host[:port] with no path")
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix_shape(cls, value: str) -> str:
        value = value.strip("/")
        if value and not is_store_key(value):
            raise ValueError(f"invalid store prefix {value!r}: use a relative path like 'a/b/c'")
        return value

    @property
    def host(self) -> str:
        """`host:port` without the scheme, as the minio client wants it."""
        if "://" in self.endpoint:
            return urlsplit(self.endpoint).netloc
        return self.endpoint

    @property
    def use_tls(self) -> bool:
        if self.secure is not None:
            return self.secure
        return self.endpoint.lower().startswith("https://")

    @property
    def root(self) -> str:
        """`s3://bucket/prefix`: the store root these settings describe."""
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


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
    COTRAIN = "cotrain"
    TUNE = "tune"
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

    @field_validator("dataset")
    @classmethod
    def _dataset_shape(cls, value: str) -> str:
        if re.search(BLANK, value):
            raise ValueError(
                f"dataset '{value}' is empty: give builtin://NAME, s3://bucket/key or a directory"
            )
        if problem := s3_uri_problem("dataset", value):
            raise ValueError(problem)
        return value


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
    # Bounded: the API server prices the CRD's CEL rule on this string by its longest length.
    pretrained: Annotated[str, Field(max_length=1024)] | None = None
    """A transformers model directory (`save_pretrained` layout): a local path, an `s3://` URI,
    `builtin://NAME` (a backbone shipped in an installed Python package, e.g.
    `builtin://all-minilm-l6-v2`) or `hf://[ORG/]NAME[@REVISION]` (the Hugging Face Hub, through
    its cache; `HF_HUB_OFFLINE=1` reads only the cache). Without `tokenizer.pretrained`, its own
    tokenizer is used. When empty, the model is built from `architecture` with random weights."""
    architecture: ArchitectureSpec = Field(default_factory=ArchitectureSpec)
    """Shape of a from-scratch model (ignored when `pretrained` is set)."""

    @field_validator("pretrained")
    @classmethod
    def _pretrained_shape(cls, value: str | None) -> str | None:
        if value is not None and (problem := pretrained_problem("pretrained", value)):
            raise ValueError(problem)
        return value


class TokenizerSpec(WireModel):
    """The tokenizer: a pretrained one, or a byte-level BPE trained on the corpus."""

    # Bounded: the API server prices the CRD's CEL rule on this string by its longest length.
    pretrained: Annotated[str, Field(max_length=1024)] | None = None
    """A tokenizer directory: a local path, an `s3://` URI, `builtin://NAME` or
    `hf://[ORG/]NAME[@REVISION]`. When empty, `model.pretrained`'s own tokenizer is used, or
    without one a byte-level BPE is trained offline on the job's texts by the first LM stage and
    stored with the job."""
    vocab_size: Annotated[int, Field(ge=260, le=262144)] = 8000
    """Vocabulary size of a trained tokenizer (byte-level BPE needs at least 260)."""
    lowercase: bool = False
    """Lowercase text before a trained tokenizer sees it."""

    @field_validator("pretrained")
    @classmethod
    def _pretrained_shape(cls, value: str | None) -> str | None:
        if value is not None and (problem := pretrained_problem("pretrained", value)):
            raise ValueError(problem)
        return value


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
    head_warmup: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1
    """When the starting model lacks some of its weights (a pretrained encoder saved without its
    masked-LM head gets a random one), those alone train first, the rest frozen, for this
    fraction of the stage's steps (extra steps, at `headWarmupLearningRate`): a random head's
    gradients would otherwise disturb the pretrained layers. 0 turns it off; a model with all
    its weights skips it."""
    head_warmup_learning_rate: Annotated[float, Field(gt=0, le=1.0)] = 3e-3
    """Peak learning rate of the head warm-up (slanted triangular over the warm-up steps)."""


class LossKind(StrEnum):
    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"


class HeadKind(StrEnum):
    CONCAT = "concat"
    ATTENTION = "attention"
    HIERARCHICAL = "hierarchical"
    GENERATIVE = "generative"


class ClassWeighting(StrEnum):
    NONE = "none"
    BALANCED = "balanced"


class AugmentationSpec(WireModel):
    """Extra, perturbed copies of the labeled training documents (word-level, seeded)."""

    copies: Annotated[int, Field(ge=0, le=20)] = 1
    """Augmented copies added per labeled training document (0 turns augmentation off)."""
    replace_rate: Annotated[float, Field(ge=0.0, le=0.5)] = 0.1
    """Fraction of a document's words replaced by a random word of the training vocabulary."""
    delete_rate: Annotated[float, Field(ge=0.0, le=0.5)] = 0.1
    """Fraction of a document's words deleted (at least one word always stays)."""
    swap_rate: Annotated[float, Field(ge=0.0, le=0.5)] = 0.1
    """Fraction of a document's words swapped with another word of the same document."""


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
    head: HeadKind = HeadKind.CONCAT
    """Classifier head. `concat`: concat pooling of [last, max, mean] hidden states (ULMFiT).
    `attention`: learned attention pooling; its weights explain a prediction (top tokens).
    `hierarchical`: long documents split into overlapping windows of `data.maxLength`, each
    encoded, combined by multi-head self-attention pooling (no truncation up to
    `maxDocumentTokens`). `generative`: scores each label's verbalizer as a continuation under the
    causal LM (works zero-shot; causal models only)."""
    head_hidden_size: Annotated[int, Field(ge=1, le=65536)] = 128
    """Width of the head's hidden layer."""
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.2
    """Dropout in the head."""
    attention_heads: Annotated[int, Field(ge=1, le=64)] = 4
    """Heads of the attention pooling (`attention` and `hierarchical` heads)."""
    window_overlap: Annotated[int, Field(ge=0, le=4096)] = 32
    """`hierarchical` head: tokens shared by consecutive windows; less than `data.maxLength`."""
    max_document_tokens: Annotated[int, Field(ge=8, le=1048576)] = 4096
    """`hierarchical` head: tokens read per document, in windows (longer documents are cut)."""
    verbalizers: dict[str, str] = Field(default_factory=dict)
    """`generative` head: label -> the text whose likelihood after the prompt scores the label.
    A label without an entry uses its own name."""
    prompt: str = " Topic:"
    """`generative` head: text placed between the document and a label's verbalizer."""
    loss: LossKind | None = None
    """`softmax` (cross-entropy, one label per document) or `sigmoid` (binary cross-entropy per
    label: binary or multi-label). Default: sigmoid when labels are lists, else softmax."""
    label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    """Label smoothing for the loss (0 = off)."""
    class_weighting: ClassWeighting = ClassWeighting.NONE
    """`balanced`: weight each class's loss by N / (classes x its training count), so rare
    classes count as much as common ones. `none`: every document counts the same."""
    class_weights: dict[str, Annotated[float, Field(gt=0.0)]] = Field(default_factory=dict)
    """Explicit loss weight per label (labels left out weigh 1); overrides `classWeighting`."""
    tune_thresholds: bool = True
    """Sigmoid loss: choose each label's decision threshold on the validation split to maximise
    its F1 (otherwise 0.5); the thresholds are exported with the model."""
    augmentation: AugmentationSpec | None = None
    """Augment the labeled training set. Off when absent."""

    @model_validator(mode="after")
    def _windows_advance(self) -> ClassifierStageSpec:
        if self.window_overlap >= self.max_document_tokens:
            raise ValueError(
                f"windowOverlap {self.window_overlap} must be less than maxDocumentTokens "
                f"{self.max_document_tokens}"
            )
        return self


class LabelingRule(WireModel):
    """A weak labeling rule: a document matching any keyword or pattern gets `label`."""

    label: Annotated[str, Field(min_length=1)]
    """The label this rule votes for (one of the dataset's labels)."""
    keywords: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    """Words matched whole and case-insensitively."""
    patterns: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    """Regular expressions (Python syntax) searched case-insensitively."""

    @model_validator(mode="after")
    def _matches_something(self) -> LabelingRule:
        if not self.keywords and not self.patterns:
            raise ValueError(f"rule for label {self.label!r} needs keywords or patterns")
        for pattern in self.patterns:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"pattern {pattern!r} is not a valid regex: {error}") from None
        return self


DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class Truncation(StrEnum):
    HEAD = "head"
    TAIL = "tail"


class CotrainModelSpec(WireModel):
    """One of the K co-trained classifiers: its weak-label source and its view of the text."""

    name: Annotated[str, Field(min_length=1, max_length=20, pattern=DNS_LABEL)]
    """Short DNS-label name; the model's stage is `cotrain-<name>`."""
    rules: list[LabelingRule] = Field(default_factory=list)
    """Weak source: labeling rules applied to the unlabeled pool; matched documents (one label
    winning the vote) join this model's training set."""
    noisy_label_field: str | None = None
    """Weak source: a JSON key of the unlabeled split holding noisy labels for this model."""
    text_field: str | None = None
    """View: the JSON key this model reads its text from. Default: `data.textField`."""
    truncation: Truncation = Truncation.HEAD
    """View: keep the first (`head`) or the last (`tail`) `data.maxLength` tokens."""


class CotrainSpec(WireModel):
    """Co-training on weak labels: K classifiers pseudo-label the unlabeled pool."""

    models: Annotated[list[CotrainModelSpec], Field(min_length=1, max_length=16)]
    """The K classifiers, one per weak-label source or view; they train in parallel on a
    cluster (one child each) and one after another locally."""
    min_agreement: Annotated[int, Field(ge=1, le=16)] = 2
    """M: a pool document becomes a pseudo-label when at least this many models predict the same
    label with confidence at least `minConfidence`."""
    min_confidence: Annotated[float, Field(gt=0.0, le=1.0)] = 0.9
    """T: the probability a model must give its predicted label for its vote to count."""
    max_per_class: Annotated[int, Field(ge=1)] | None = None
    """Accept at most this many pseudo-labels per class (the most confident). Default: no cap."""
    balance: Annotated[float, Field(ge=1.0)] | None = 3.0
    """No class gets more than this many times the pseudo-labels of the rarest accepted class
    (null turns balancing off)."""
    rounds: Annotated[int, Field(ge=1, le=10)] = 1
    """Co-training rounds: in each later round the K models also train on the pseudo-labels of
    the round before."""
    max_pool_examples: Annotated[int, Field(ge=1)] | None = None
    """Pseudo-label at most this many unlabeled texts (a seeded sample). Default: all."""
    classifier: ClassifierStageSpec | None = None
    """Hyperparameters of the K models. Default: those of `stages.classifier`."""

    @model_validator(mode="after")
    def _agreement_possible(self) -> CotrainSpec:
        if self.min_agreement > len(self.models):
            raise ValueError(
                f"minAgreement {self.min_agreement} exceeds the {len(self.models)} models"
            )
        names = [model.name for model in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique: {names}")
        return self


class DomainKind(StrEnum):
    UNIFORM = "uniform"
    LOGUNIFORM = "loguniform"
    CHOICE = "choice"
    INT = "int"


class SearchDomain(WireModel):
    """Where one hyperparameter is sampled from."""

    type: DomainKind
    """`uniform` or `loguniform` over [low, high]; `int`: an integer in [low, high];
    `choice`: one of `values`."""
    low: float | None = None
    """Lower bound (uniform, loguniform, int)."""
    high: float | None = None
    """Upper bound, inclusive (uniform, loguniform, int)."""
    values: list[float] = Field(default_factory=list)
    """The candidates of a `choice`."""

    @model_validator(mode="after")
    def _bounds(self) -> SearchDomain:
        if self.type == DomainKind.CHOICE:
            if not self.values:
                raise ValueError("a choice needs at least one value in `values`")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type.value} domain needs `low` and `high`")
        if self.low >= self.high:
            raise ValueError(f"low {self.low} must be less than high {self.high}")
        if self.type == DomainKind.LOGUNIFORM and self.low <= 0:
            raise ValueError(f"a loguniform domain needs low > 0, got {self.low}")
        return self


TUNABLE = (
    "learningRate", "dropout", "epochsPerPhase", "finalEpochs", "unfreezePhases",
    "lrDecayPerPhase", "discriminativeFactor", "weightDecay", "labelSmoothing",
    "headHiddenSize", "batchSize", "cutFrac",
)  # fmt: skip
"""Classifier hyperparameters (wire names) a sweep may search over."""


class SchedulerKind(StrEnum):
    ASHA = "asha"
    MEDIAN = "median"
    PBT = "pbt"
    FIFO = "fifo"


class SearchAlgorithm(StrEnum):
    RANDOM = "random"
    OPTUNA = "optuna"


class TuneBackend(StrEnum):
    AUTO = "auto"
    POD = "pod"
    RAYJOB = "rayjob"


class TuneSpec(WireModel):
    """A Ray Tune sweep over the classifier stage; its best config trains the final classifier."""

    space: Annotated[dict[str, SearchDomain], Field(min_length=1)]
    """Search space: classifier hyperparameter (wire name, e.g. `learningRate`) -> domain."""
    metric: str = "validAccuracy"
    """Metric the classifier reports each epoch that ranks trials (`validAccuracy`,
    `validLoss`, `validMacroF1`)."""
    mode: Literal["max", "min"] = "max"
    """Whether a larger or a smaller `metric` is better."""
    trials: Annotated[int, Field(ge=1, le=10000)] = 8
    """Trials (sampled configurations) in the sweep."""
    concurrent_trials: Annotated[int, Field(ge=1, le=1024)] | None = None
    """Trials running at once. Default: as many as the CPUs and GPUs allow."""
    cpus_per_trial: Annotated[float, Field(gt=0.0, le=256.0)] = 1.0
    """CPUs each trial reserves."""
    gpus_per_trial: Annotated[float, Field(ge=0.0, le=64.0)] = 0.0
    """GPUs each trial reserves (fractions share a GPU)."""
    scheduler: SchedulerKind = SchedulerKind.ASHA
    """Trial scheduler: `asha` (early stopping), `median` (median stopping rule), `pbt`
    (population-based training), `fifo` (no early stopping)."""
    grace_period: Annotated[int, Field(ge=1)] = 1
    """Epochs a trial runs before the scheduler may stop it."""
    search_algorithm: SearchAlgorithm = SearchAlgorithm.RANDOM
    """`random` sampling, or `optuna` (TPE; needs the optuna package)."""
    time_budget_seconds: Annotated[int, Field(ge=1)] | None = None
    """Stop starting and running trials after this many seconds. Default: no limit."""
    backend: TuneBackend = TuneBackend.AUTO
    """On a cluster: `pod` runs a Ray head inside one pod; `rayjob` creates a KubeRay RayJob;
    `auto` picks `rayjob` when the RayJob CRD is installed, else `pod`."""

    @model_validator(mode="after")
    def _tunable_fields(self) -> TuneSpec:
        unknown = sorted(set(self.space) - set(TUNABLE))
        if unknown:
            raise ValueError(f"cannot tune {unknown}: tunable fields are {list(TUNABLE)}")
        return self


class StagesSpec(WireModel):
    """The pipeline: each ULMFiT stage and its hyperparameters."""

    pretrain: LMStageSpec = Field(default_factory=lambda: LMStageSpec(enabled=False))
    """LM pretraining on the unlabeled split (general domain). Off when the section is absent;
    writing the section turns it on unless it says `enabled: false`."""
    finetune: LMStageSpec = Field(default_factory=LMStageSpec)
    """LM fine-tuning on the target task's texts (labeled and unlabeled, labels unused)."""
    cotrain: CotrainSpec | None = None
    """Co-training on weak labels before the classifier. Off when absent."""
    tune: TuneSpec | None = None
    """A Ray Tune sweep of the classifier's hyperparameters. Off when absent."""
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
    """`auto`: bf16 on GPU, fp32 on CPU. `bf16` and `fp32` also run on CPU; `fp16` needs GPUs
    (`resources.gpusPerWorker` above 0)."""
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
    name: str | None = None
    """The stage's key in the store (`cotrain-<model>`, say); default: `stage`."""
    run: str
    """Run path under the store root, where this job's objects live: `<namespace>/<job>/<uid>` in
    the cluster (each job instance its own), `<namespace>/<job>` for the local runner."""
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
    """Hyperparameters of the classifier stage (also read by evaluate, cotrain and tune)."""
    cotrain: CotrainSpec | None = None
    """Co-training settings (cotrain stages, and the stages that read their pseudo-labels)."""
    cotrain_model: str | None = None
    """Cotrain stage: which of `cotrain.models` this stage trains."""
    cotrain_round: int = 1
    """Cotrain stage: the round (1-based)."""
    pseudo_labels_from: list[str] = Field(default_factory=list)
    """Store keys of the cotrain stages whose votes become pseudo-labels for this stage."""
    tune: TuneSpec | None = None
    """Sweep settings of the tune stage."""
    tuned_by: str | None = None
    """Store key of the tune stage whose best parameters override `classifier`."""
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    keep_last: int = 2
    progress_interval_seconds: float = 5.0
    seed: int = 42

    @model_validator(mode="after")
    def _has_its_hyperparameters(self) -> StageConfig:
        lm_stage = self.stage in (StageName.PRETRAIN, StageName.FINETUNE)
        if lm_stage and self.lm is None:
            raise ValueError(f"stage {self.stage} needs `lm` hyperparameters")
        needs_classifier = (
            StageName.CLASSIFIER, StageName.EVALUATE, StageName.COTRAIN, StageName.TUNE,
        )  # fmt: skip
        if self.stage in needs_classifier and self.classifier is None:
            raise ValueError(f"stage {self.stage} needs `classifier` hyperparameters")
        if self.stage == StageName.COTRAIN and (self.cotrain is None or not self.cotrain_model):
            raise ValueError("a cotrain stage needs `cotrain` and `cotrainModel`")
        if self.stage == StageName.TUNE and self.tune is None:
            raise ValueError("a tune stage needs `tune`")
        return self

    @property
    def key(self) -> str:
        """The stage's key in the store."""
        return self.name or self.stage.value

    @classmethod
    def read(cls, path: str | Path) -> StageConfig:
        return cls.model_validate(json.loads(Path(path).read_text()))

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_wire(), indent=2, sort_keys=True) + "\n")
