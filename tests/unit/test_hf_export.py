"""The transformers module shipped with an export: every head gives the trainer's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.harness.parts import require_modules

require_modules("torch", "transformers")
import torch  # noqa: E402
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification  # noqa: E402
from ulmfit_trainer import hf_export  # noqa: E402
from ulmfit_trainer.config import HeadKind, ModelFamily  # noqa: E402
from ulmfit_trainer.data import pad_batch  # noqa: E402
from ulmfit_trainer.models import HeadSettings, UlmfitClassifier, build_lm  # noqa: E402
from ulmfit_trainer.tokenize import special_ids, train_tokenizer  # noqa: E402

from tests.unit.test_models import ARCH, LABELS, batch, head_settings, lm  # noqa: E402

CASES = [
    (kind, family)
    for family in ModelFamily
    for kind in HeadKind
    if not (kind == HeadKind.GENERATIVE and family == ModelFamily.MASKED)
]


def trained(kind: HeadKind, family: ModelFamily) -> UlmfitClassifier:
    """A classifier whose BatchNorm statistics are not the defaults (a train-mode pass)."""
    model = UlmfitClassifier(lm(family).base_model, head_settings(kind, family))
    ids, mask = batch(30 if kind == HeadKind.HIERARCHICAL else 10)
    with torch.no_grad():
        model.train()(ids, mask)
    return model.eval()


def export(model: UlmfitClassifier, directory: Path, cut: dict | None = None) -> Path:
    model.save(directory)
    hf_export.add_remote_code(
        directory, dict(model.settings.__dict__), cut or {"max_tokens": 1000, "suffix_tokens": 0}
    )
    return directory


def left_padded(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out_ids, out_mask = torch.full_like(ids, 7), torch.zeros_like(mask)
    for row in range(len(ids)):
        n = int(mask[row].sum())
        out_ids[row, ids.size(1) - n :] = ids[row, :n]
        out_mask[row, ids.size(1) - n :] = 1
    return out_ids, out_mask


@pytest.mark.parametrize(("kind", "family"), CASES)
def test_every_head_loads_as_a_sequence_classifier_with_the_same_logits(
    kind: HeadKind, family: ModelFamily, tmp_path: Path
) -> None:
    model = trained(kind, family)
    ids, mask = batch(30 if kind == HeadKind.HIERARCHICAL else 10)
    with torch.no_grad():
        expected = model(ids, mask)
    export(model, tmp_path)
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(hf).__name__ == "UlmfitForSequenceClassification" and not hf.training
    assert "ulmfit_trainer" not in type(hf).__module__
    with torch.no_grad():
        got = hf(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
        # A caller that pads on the left gets the same: rows are re-packed to the right.
        left = hf(*left_padded(ids, mask))
    torch.testing.assert_close(got.logits, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(left.logits, expected, rtol=0, atol=1e-5)
    assert hf.config.id2label == dict(enumerate(LABELS))
    assert hf.config.problem_type == "single_label_classification"
    # The directory still reads as before: the bare backbone and the trainer's own loader.
    assert type(AutoConfig.from_pretrained(tmp_path)).__name__ in ("GPT2Config", "BertConfig")
    AutoModel.from_pretrained(tmp_path)
    again = UlmfitClassifier.load(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids, mask), expected)


def test_the_loss_and_the_sigmoid_problem_type(tmp_path: Path) -> None:
    settings = HeadSettings(labels=LABELS, hidden_size=16, dropout=0.0, loss="sigmoid",
                            multi_label=True, thresholds=[0.3, 0.5, 0.7])  # fmt: skip
    model = UlmfitClassifier(lm(ModelFamily.CAUSAL).base_model, settings).eval()
    export(model, tmp_path)
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path, trust_remote_code=True)
    assert hf.config.problem_type == "multi_label_classification"
    ids, mask = batch()
    out = hf(input_ids=ids, attention_mask=mask, labels=torch.tensor([[1, 0, 1]] * 4))
    assert out.loss is not None and torch.isfinite(out.loss)


def test_long_documents_are_cut_as_the_tokenizer_cuts_them(tmp_path: Path) -> None:
    texts = [f"word{i % 7} other{i % 5} thing{i % 3}" for i in range(200)]
    tokenizer = train_tokenizer(texts, 300)
    cut = hf_export.truncation(tokenizer, 12)
    assert cut == {"max_tokens": 12, "suffix_tokens": 1}  # <s> ... </s>: one closing token
    torch.manual_seed(0)
    base = build_lm(ModelFamily.CAUSAL, ARCH, len(tokenizer), special_ids(tokenizer)).base_model
    model = UlmfitClassifier(base, head_settings(HeadKind.CONCAT)).eval()
    export(model, tmp_path, cut)
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path, trust_remote_code=True)
    long = " ".join(texts[:10])
    short = "word1 other2"
    truncated = tokenizer([long, short], truncation=True, max_length=12)["input_ids"]
    assert len(truncated[0]) == 12
    with torch.no_grad():
        expected = model(*pad_batch(truncated, tokenizer.pad_token_id))
        whole = tokenizer([long, short], padding=True, return_tensors="pt")
        got = hf(input_ids=whole["input_ids"], attention_mask=whole["attention_mask"]).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_an_unknown_head_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(hf_export.UnsupportedHead, match="'mystery'"):
        hf_export.add_remote_code(tmp_path, {"head": "mystery", "labels": LABELS}, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_the_shipped_modules_need_only_torch_and_transformers() -> None:
    for name in (hf_export.CONFIG_MODULE, hf_export.MODEL_MODULE):
        source = hf_export.template(name)
        assert "ulmfit_trainer" not in source.replace("ulmfit_trainer.models", "")
        imports = {
            line.split()[1].split(".")[0]
            for line in source.splitlines()
            if line.startswith(("import ", "from "))
        }
        assert imports <= {"__future__", "os", "typing", "torch", "transformers", ""}, imports


def test_the_model_card_names_data_stages_metrics_and_use() -> None:
    facts = hf_export.CardFacts(
        run="ns/job/uid",
        dataset="builtin://debian-packages",
        labels=["admin", "net"],
        multi_label=False,
        split_sizes={"train": 320, "test": 160},
        backbone={"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "origin": "built from scratch"},
        head={"head": "concat", "loss": "softmax", "max_length": 32, "hidden_size": 16},
        stages=[
            hf_export.StageSummary("classifier", {"learningRate": 0.005}, {"validAccuracy": 0.5})
        ],
        test_metrics={"accuracy": 0.625, "macroF1": 0.5},
        per_class={"admin": {"precision": 1.0, "recall": 0.5, "f1": 0.667, "support": 4.0}},
    )
    card = hf_export.model_card(facts)
    for needle in ("builtin://debian-packages", "admin, net", "train examples | 320",
                   "### classifier", "learningRate | 0.005", "accuracy | 0.625", "gpt2",
                   "trust_remote_code=True", "first 32 tokens", "## Intended use and limits"):
        assert needle in card, needle  # fmt: skip
    facts.remote_code, facts.remote_code_note = False, "no module"
    assert "ulmfit predict" in hf_export.model_card(facts)
