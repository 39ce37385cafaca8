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

from ulmfit_trainer.config import ModelFamily, StageConfig
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
) -> tuple[PreTrainedTokenizerBase, Path]:
    """The tokenizer every stage of this job uses, and a local directory holding it.

    A pretrained one is fetched as given. Otherwise the store's ``<run>/tokenizer/`` is used, and
    when it is not there yet rank 0 trains one on ``texts()`` and uploads it while the other ranks
    wait at ``barrier``.
    """
    local = Path(workdir or tempfile.mkdtemp(prefix="ulmfit-tokenizer-")) / "tokenizer"
    if config.tokenizer.pretrained:
        directory = fetch(config.tokenizer.pretrained, local, config.s3)
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
