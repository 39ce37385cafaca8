"""The job's tokenizer: a byte-level BPE trained offline on the corpus, or a pretrained one.

A trained tokenizer is stored once per job under ``<run>/tokenizer/`` and every later stage (and
the exported model) uses exactly that one; its sha256 goes into each checkpoint's meta so a
stage can tell when weights and vocabulary do not belong together.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ulmfit_trainer.backbones import family_of, has_tokenizer, model_config
from ulmfit_trainer.config import ModelFamily, StageConfig
from ulmfit_trainer.errors import InvalidSpec
from ulmfit_trainer.store import CheckpointStore, fetch

log = logging.getLogger(__name__)

PAD, BOS, EOS, MASK = "<pad>", "<s>", "</s>", "<mask>"
TOKENIZER_FILE = "tokenizer.json"


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    lowercase: bool = False,
    family: ModelFamily = ModelFamily.CAUSAL,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts``: every string encodes, no unknown token needed."""
    tok = Tokenizer(models.BPE())
    steps: list[normalizers.Normalizer] = [normalizers.NFKC()]
    if lowercase:
        steps.append(normalizers.Lowercase())
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    masked = family == ModelFamily.MASKED
    specials = [PAD, BOS, EOS] + ([MASK] if masked else [])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    # Every document is framed <s> ... </s>, in training and for whoever loads the export: the
    # causal classifier pools the final </s>, which has attended to the whole document.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        pair=f"{BOS} $A {EOS} $B {EOS}",
        special_tokens=[(BOS, bos), (EOS, eos)],
    )
    extra = {"mask_token": MASK, "cls_token": BOS, "sep_token": EOS} if masked else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, **extra
    )


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    if tokenizer.pad_token is None:
        # GPT-2 style tokenizers ship without one; padding positions are masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_hash(directory: str | Path) -> str:
    """sha256 of ``tokenizer.json``: equal hashes mean equal token ids for every text."""
    path = Path(directory) / TOKENIZER_FILE
    if not path.exists():
        return ""
    return hashlib.sha256(path.read_bytes()).hexdigest()


FetchPretrained = Callable[[str, Path, str], Path]
"""``(uri, dest, field) -> local directory`` of a pretrained model or tokenizer."""


def _fetcher(config: StageConfig) -> FetchPretrained:
    return lambda uri, dest, field: fetch(uri, dest, config.s3, field=field)


def special_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int | None]:
    return {
        "pad": tokenizer.pad_token_id,
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "mask": tokenizer.mask_token_id,
    }


def job_tokenizer(
    config: StageConfig,
    checkpoints: CheckpointStore,
    texts: Callable[[], Iterable[str]],
    *,
    rank: int,
    barrier: Callable[[], None],
    workdir: str | Path | None = None,
    fetch_pretrained: FetchPretrained | None = None,
) -> tuple[PreTrainedTokenizerBase, Path]:
    """The tokenizer every stage of this job uses, and a local directory holding it.

    A pretrained one is fetched as given (and checked against ``model.pretrained``). Without one,
    a pretrained model brings its own. Otherwise the store's ``<run>/tokenizer/`` is used, and
    when it is not there yet rank 0 trains one on ``texts()`` and uploads it while the other ranks
    wait at ``barrier``. ``fetch_pretrained(uri, dest, field)`` makes a pretrained URI local
    (default: ``store.fetch``; a stage passes its `HubMirror`).
    """
    work = Path(workdir or tempfile.mkdtemp(prefix="ulmfit-tokenizer-"))
    fetch_pretrained = fetch_pretrained or _fetcher(config)
    local = work / "tokenizer"
    if config.tokenizer.pretrained:
        uri = config.tokenizer.pretrained
        directory = fetch_pretrained(uri, local, "tokenizer.pretrained")
        tokenizer = load_tokenizer(directory)
        if config.model.pretrained:
            check_pair(config, tokenizer, directory, work / "pretrained-config", fetch_pretrained)
        return tokenizer, Path(directory)
    if config.model.pretrained:
        # The backbone's embeddings were learned for its own token ids: a BPE trained here would
        # feed it other tokens under the same ids.
        uri = config.model.pretrained
        directory = fetch_pretrained(uri, work / "pretrained", "model.pretrained")
        if not has_tokenizer(directory):
            raise InvalidSpec([(
                "model.pretrained", uri,
                "the model directory holds no tokenizer: set tokenizer.pretrained",
            )])  # fmt: skip
        return load_tokenizer(directory), Path(directory)
    store = checkpoints.store
    prefix = checkpoints.artifact_key("tokenizer")
    # tokenizer.json is uploaded last, so its presence means the directory is complete.
    marker = f"{prefix}/{TOKENIZER_FILE}"
    if rank == 0 and not store.exists(marker):
        spec = config.tokenizer
        log.info("training a byte-level BPE tokenizer (vocab %d)", spec.vocab_size)
        tokenizer = train_tokenizer(texts(), spec.vocab_size, spec.lowercase, config.model.family)
        tokenizer.save_pretrained(str(local))
        for path in sorted(local.iterdir(), key=lambda p: p.name == TOKENIZER_FILE):
            store.put_file(f"{prefix}/{path.name}", path)
        log.info("tokenizer stored at %s (%d tokens)", store.uri(prefix), len(tokenizer))
    barrier()
    if not (local / TOKENIZER_FILE).exists():
        store.get_dir(prefix, local)
    return load_tokenizer(local), local


def check_pair(
    config: StageConfig,
    tokenizer: PreTrainedTokenizerBase,
    tokenizer_dir: str | Path,
    workdir: str | Path,
    fetch_pretrained: FetchPretrained | None = None,
) -> None:
    """`InvalidSpec` naming both fields when ``tokenizer.pretrained`` clearly does not belong to
    ``model.pretrained``: ids past the model's embedding rows (resizing would train them from
    random), or a tokenizer saved with a model of the other family."""
    model_uri = str(config.model.pretrained)
    if model_uri.startswith("s3://"):
        # Only its config is needed here; the stage fetches the weights.
        key = model_uri.rstrip("/") + "/config.json"
        path = fetch(key, Path(workdir) / "config.json", config.s3)
        model = model_config(path.parent)
    else:
        fetch_pretrained = fetch_pretrained or _fetcher(config)
        model = model_config(fetch_pretrained(model_uri, Path(workdir), "model.pretrained"))
    if model is None:
        return
    value = f"{config.tokenizer.pretrained} / {model_uri}"
    rows = model.get("vocab_size")
    if isinstance(rows, int) and len(tokenizer) > rows:
        raise InvalidSpec([(
            "tokenizer.pretrained / model.pretrained", value,
            f"the tokenizer has {len(tokenizer)} tokens but the model's embeddings only {rows}"
            " rows: give the model's own tokenizer (or leave tokenizer.pretrained empty)",
        )])  # fmt: skip
    model_family = family_of(model)
    tokenizer_family = family_of(model_config(tokenizer_dir))
    if model_family and tokenizer_family and model_family != tokenizer_family:
        raise InvalidSpec([(
            "tokenizer.pretrained / model.pretrained", value,
            f"the tokenizer belongs to a {tokenizer_family} model, the model is {model_family}",
        )])  # fmt: skip
