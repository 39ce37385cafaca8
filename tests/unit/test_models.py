"""Layer groups, gradual unfreezing, the concat-pooling classifier, losses and the export."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.parts import require_modules

require_modules("torch", "transformers")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from ulmfit_trainer.config import ArchitectureSpec, LossKind, ModelFamily  # noqa: E402
from ulmfit_trainer.models import (  # noqa: E402
    HEAD_SETTINGS,
    HEAD_WEIGHTS,
    HeadSettings,
    UlmfitClassifier,
    build_lm,
    classification_loss,
    default_loss,
    layer_groups,
    set_trainable,
)
from ulmfit_trainer.schedules import unfreeze_plan  # noqa: E402

ARCH = ArchitectureSpec(layers=3, hidden_size=32, heads=2, context_length=32, dropout=0.0)
SPECIAL = {"pad": 0, "bos": 1, "eos": 2}
LABELS = ["a", "b", "c"]


def lm(family: ModelFamily):
    torch.manual_seed(0)
    return build_lm(family, ARCH, vocab_size=100, special_ids=SPECIAL)


def classifier(family: ModelFamily) -> UlmfitClassifier:
    base = lm(family).base_model
    settings = HeadSettings(labels=LABELS, family=family.value, hidden_size=16, dropout=0.0)
    return UlmfitClassifier(base, settings)


def assert_partition(model, groups) -> None:
    """Every parameter of the model is in exactly one group."""
    grouped = [id(p) for g in groups for p in g.params.values()]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("family", list(ModelFamily))
def test_lm_layer_groups_bottom_to_top(family: ModelFamily) -> None:
    model = lm(family)
    groups = layer_groups(model)
    assert [g.name for g in groups] == ["embeddings", "block-0", "block-1", "block-2", "head"]
    assert_partition(model, groups)
    embeddings = groups[0].params
    # The tied output projection is the input embedding: listed once, at the bottom.
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert any(p is model.get_input_embeddings().weight for p in embeddings.values())
    assert all(".h.1." in n or ".layer.1." in n for n in groups[2].params)
    head = set(groups[-1].params)
    if family == ModelFamily.CAUSAL:
        assert head == {"transformer.ln_f.weight", "transformer.ln_f.bias"}
    else:
        assert head and all(n.startswith("cls.predictions.") for n in head)


@pytest.mark.parametrize("family", list(ModelFamily))
def test_classifier_layer_groups_put_the_head_on_top(family: ModelFamily) -> None:
    model = classifier(family)
    groups = layer_groups(model)
    assert [g.name for g in groups] == ["embeddings", "block-0", "block-1", "block-2", "head"]
    assert_partition(model, groups)
    assert all(n.startswith("backbone.") for g in groups[:-1] for n in g.params)
    head = set(groups[-1].params)
    assert {n for n in head if n.startswith("head.")} == {
        n for n, _ in model.named_parameters() if n.startswith("head.")
    }
    # No LM head in a classifier: only the final norm (GPT-2) joins the head group.
    assert {n for n in head if not n.startswith("head.")} <= {
        "backbone.ln_f.weight",
        "backbone.ln_f.bias",
    }


@pytest.mark.parametrize("family", list(ModelFamily))
def test_gradual_unfreezing_trains_exactly_the_top_groups(family: ModelFamily) -> None:
    model = classifier(family)
    groups = layer_groups(model)
    ids = torch.randint(3, 100, (4, 10))
    mask = torch.ones_like(ids)
    targets = torch.tensor([0, 1, 2, 0])
    for n_top in unfreeze_plan(len(groups), 3):  # [1, 2, 5]
        set_trainable(groups, n_top)
        before = {n: p.detach().clone() for g in groups for n, p in g.params.items()}
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-2)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(ids, mask), targets).backward()
        optimizer.step()
        for i, group in enumerate(groups):
            should_train = i >= len(groups) - n_top
            for name, param in group.params.items():
                assert param.requires_grad == should_train, name
                changed = not torch.equal(param, before[name])
                if should_train:
                    assert param.grad is not None, name
                else:
                    assert param.grad is None and not changed, name
        # At least one weight of each trainable group really moved.
        for group in groups[len(groups) - n_top :]:
            assert any(not torch.equal(p, before[n]) for n, p in group.params.items()), group.name


@pytest.mark.parametrize("family", list(ModelFamily))
def test_concat_pooling_ignores_padding(family: ModelFamily) -> None:
    model = classifier(family).eval()
    short = torch.tensor([[1, 5, 6, 7, 2]])
    long = torch.tensor([[1, 8, 9, 10, 11, 12, 13, 2]])
    alone = model(short, torch.ones_like(short))
    padded = torch.cat([short, torch.zeros((1, 3), dtype=torch.long)], dim=1)
    batch = torch.cat([padded, long])
    mask = torch.tensor([[1] * 5 + [0] * 3, [1] * 8])
    together = model(batch, mask)
    assert together.shape == (2, len(LABELS))
    torch.testing.assert_close(together[0], alone[0], atol=1e-5, rtol=1e-4)


def test_causal_last_token_is_the_last_real_one() -> None:
    head = classifier(ModelFamily.CAUSAL).head.eval()
    hidden = torch.zeros((1, 4, 32))
    hidden[0, 2] = 5.0  # the last real token (positions 3 is padding)
    hidden[0, 3] = -7.0
    mask = torch.tensor([[1, 1, 1, 0]])
    seen = {}
    head.norm.register_forward_hook(lambda _m, args, _o: seen.setdefault("pooled", args[0]))
    head(hidden, mask)
    last, max_pool, mean_pool = seen["pooled"][0].split(32)
    assert torch.all(last == 5.0) and torch.all(max_pool == 5.0)
    torch.testing.assert_close(mean_pool, torch.full((32,), 5.0 / 3))


def test_softmax_loss_and_label_smoothing() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    targets = torch.tensor([0, 2])
    plain = classification_loss(LossKind.SOFTMAX, logits, targets)
    torch.testing.assert_close(plain, F.cross_entropy(logits, targets))
    smooth = classification_loss(LossKind.SOFTMAX, logits, targets, label_smoothing=0.1)
    torch.testing.assert_close(smooth, F.cross_entropy(logits, targets, label_smoothing=0.1))
    assert smooth > plain  # confident right answers pay for the smoothing
    with pytest.raises(ValueError):
        classification_loss(LossKind.SOFTMAX, logits, torch.ones((2, 3)))


def test_sigmoid_loss_for_indices_multi_hot_and_smoothing() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.0], [-3.0, 1.0, 4.0]])
    one_hot = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    expected = F.binary_cross_entropy_with_logits(logits, one_hot)
    torch.testing.assert_close(
        classification_loss(LossKind.SIGMOID, logits, torch.tensor([0, 2])), expected
    )
    torch.testing.assert_close(classification_loss(LossKind.SIGMOID, logits, one_hot), expected)
    smoothed = one_hot * 0.8 + 0.1
    torch.testing.assert_close(
        classification_loss(LossKind.SIGMOID, logits, one_hot, label_smoothing=0.2),
        F.binary_cross_entropy_with_logits(logits, smoothed),
    )


def test_loss_kind_defaults_from_the_labels() -> None:
    assert default_loss(multi_label=True, requested=None) == LossKind.SIGMOID
    assert default_loss(multi_label=False, requested=None) == LossKind.SOFTMAX
    assert default_loss(multi_label=False, requested=LossKind.SIGMOID) == LossKind.SIGMOID


@pytest.mark.parametrize("family", list(ModelFamily))
def test_export_loads_with_plain_transformers(family: ModelFamily, tmp_path: Path) -> None:
    model = classifier(family).eval()
    model.save(tmp_path)
    assert (tmp_path / HEAD_WEIGHTS).exists() and (tmp_path / HEAD_SETTINGS).exists()
    backbone = transformers.AutoModel.from_pretrained(tmp_path)
    assert type(backbone).__name__ == type(model.backbone).__name__
    assert backbone.config.id2label == dict(enumerate(LABELS))
    assert backbone.config.label2id == {label: i for i, label in enumerate(LABELS)}
    for name, value in model.backbone.state_dict().items():
        torch.testing.assert_close(backbone.state_dict()[name], value)
    again = UlmfitClassifier.load(tmp_path).eval()
    ids = torch.tensor([[1, 5, 6, 2]])
    torch.testing.assert_close(again(ids, torch.ones_like(ids)), model(ids, torch.ones_like(ids)))


# --------------------------------------------------------------------------- selectable heads

from ulmfit_trainer.config import HeadKind  # noqa: E402
from ulmfit_trainer.data import pad_batch  # noqa: E402
from ulmfit_trainer.errors import InvalidSpec  # noqa: E402
from ulmfit_trainer.models import generative_settings, window_spans  # noqa: E402


class WordTokenizer:
    """A stand-in tokenizer for head settings: one id per whitespace word (pure logic)."""

    eos_token_id, bos_token_id = 2, 1

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [3 + sum(map(ord, word)) % 90 for word in text.split()]}


def head_settings(kind: HeadKind, family: ModelFamily = ModelFamily.CAUSAL) -> HeadSettings:
    common = dict(family=family.value, hidden_size=16, dropout=0.0, max_length=8,
                  window_overlap=2, attention_heads=2)  # fmt: skip
    if kind == HeadKind.GENERATIVE:
        verbalizers = {"a": "alpha", "b": "beta gamma"}
        return generative_settings(WordTokenizer(), LABELS, verbalizers, " Topic:", **common)
    return HeadSettings(labels=LABELS, head=kind.value, **common)


def head_classifier(kind: HeadKind, family: ModelFamily = ModelFamily.CAUSAL):
    return UlmfitClassifier(lm(family).base_model, head_settings(kind, family))


def batch(length: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(3, 100, (4, length))
    mask = torch.ones_like(ids)
    mask[1, length // 2 :] = 0
    mask[3, 3:] = 0
    return ids, mask


@pytest.mark.parametrize("kind", list(HeadKind))
def test_every_head_saves_and_loads_to_the_same_predictions(kind: HeadKind, tmp_path) -> None:
    model = head_classifier(kind).eval()
    ids, mask = batch(30 if kind == HeadKind.HIERARCHICAL else 10)
    expected = model(ids, mask)
    assert expected.shape == (4, len(LABELS)) and torch.isfinite(expected).all()
    model.save(tmp_path)
    again = UlmfitClassifier.load(tmp_path).eval()
    assert again.settings == model.settings
    torch.testing.assert_close(again(ids, mask), expected)


@pytest.mark.parametrize("kind", list(HeadKind))
def test_gradual_unfreezing_works_for_every_head(kind: HeadKind) -> None:
    model = head_classifier(kind)
    groups = layer_groups(model)
    assert_partition(model, groups)
    head = {n for n, _ in model.named_parameters() if n.startswith("head.")}
    assert head and head <= set(groups[-1].params)  # the head trains from phase 1
    ids, mask = batch(30 if kind == HeadKind.HIERARCHICAL else 10)
    targets = torch.tensor([0, 1, 2, 0])
    for n_top in (1, len(groups)):
        set_trainable(groups, n_top)
        model.zero_grad(set_to_none=True)
        classification_loss(LossKind.SOFTMAX, model(ids, mask), targets).backward()
        for i, group in enumerate(groups):
            for name, param in group.params.items():
                if i < len(groups) - n_top:
                    assert param.grad is None, name
        assert any(
            p.grad is not None and p.grad.abs().sum() > 0 for p in groups[-1].params.values()
        )
        if n_top == len(groups):
            assert any(p.grad is not None for p in groups[0].params.values())


def test_attention_weights_are_a_distribution_over_real_tokens() -> None:
    model = head_classifier(HeadKind.ATTENTION).eval()
    ids, mask = batch()
    weights = model.predict(ids, mask).token_weights
    assert weights is not None and weights.shape == ids.shape
    torch.testing.assert_close(weights.sum(1), torch.ones(4))
    assert torch.all(weights[mask == 0] == 0) and torch.all(weights[mask == 1] > 0)
    # Padding changes nothing: a document alone gets the same weights and logits.
    alone = model.predict(ids[3:, :3], mask[3:, :3])
    torch.testing.assert_close(alone.token_weights[0], weights[3, :3])
    torch.testing.assert_close(alone.logits[0], model(ids, mask)[3], atol=1e-5, rtol=1e-4)


def test_window_spans_cover_the_document_with_the_overlap() -> None:
    assert window_spans(5, 8, 2) == [(0, 5)]
    assert window_spans(20, 8, 2) == [(0, 8), (6, 14), (12, 20)]
    assert window_spans(21, 8, 2) == [(0, 8), (6, 14), (12, 20), (13, 21)]
    for length in range(1, 200, 7):
        spans = window_spans(length, 16, 4)
        assert set().union(*(range(a, b) for a, b in spans)) == set(range(length))
        assert all(b - a == min(16, length) for a, b in spans)
    with pytest.raises(ValueError):
        window_spans(10, 4, 4)


def test_hierarchical_head_encodes_each_window_and_pools_them_all() -> None:
    model = head_classifier(HeadKind.HIERARCHICAL).eval()
    ids, mask = batch(64)  # 8x the window of 8 tokens
    seen = []
    model.backbone.register_forward_hook(
        lambda _m, _a, kwargs, _o: seen.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    out = model.predict(ids, mask)
    lengths = mask.sum(1).tolist()
    assert out.windows == [window_spans(n, 8, 2) for n in lengths]
    assert sum(shape[0] for shape in seen) == sum(len(w) for w in out.windows)
    assert all(shape[1] <= 8 for shape in seen)  # no window exceeds the context it was given
    for row, spans in enumerate(out.windows):
        weights = out.window_weights[row]
        assert torch.all(weights[: len(spans)] > 0) and torch.all(weights[len(spans) :] == 0)
        torch.testing.assert_close(weights.sum(), torch.tensor(1.0))


def test_hierarchical_heads_must_divide_the_width() -> None:
    settings = head_settings(HeadKind.HIERARCHICAL)
    settings.attention_heads = 3  # hidden size 32
    with pytest.raises(InvalidSpec, match=r"stages\.classifier\.attentionHeads"):
        UlmfitClassifier(lm(ModelFamily.CAUSAL).base_model, settings)


def test_generative_head_scores_verbalizers_as_continuations() -> None:
    model = head_classifier(HeadKind.GENERATIVE).eval()
    s = model.settings
    assert s.verbalizers == [" alpha", " beta gamma", " c"]  # a label without one: its name
    ids = torch.tensor([[1, 10, 11, 12, 2]])
    scores = model.verbalizer_log_probs(ids, torch.ones_like(ids)).detach()
    # By hand: the mean log-probability of each verbalizer's tokens after doc (no </s>) + prompt.
    lm_model = lm(ModelFamily.CAUSAL).eval()
    for label, verbalizer in enumerate(s.verbalizer_ids):
        sequence = torch.tensor([[1, 10, 11, 12, *s.prompt_ids, *verbalizer]])
        with torch.no_grad():
            log_probs = torch.log_softmax(lm_model(sequence).logits[0], dim=-1)
        start = 4 + len(s.prompt_ids)
        expected = sum(
            float(log_probs[start + k - 1, token]) for k, token in enumerate(verbalizer)
        ) / len(verbalizer)
        assert float(scores[0, label]) == pytest.approx(expected, abs=1e-4)
    # Calibrated: the logit is the score minus the verbalizer's log-probability after the
    # prompt alone (so the logits start as pointwise mutual information).
    logits = model(ids, torch.ones_like(ids))
    torch.testing.assert_close(logits, scores + model.head.bias)
    prior = model._continuation_log_probs([[1]], torch.device("cpu"))[0]
    torch.testing.assert_close(model.head.bias.detach(), -prior)
    # Batch calibration on (unlabeled) documents: their mean logit per label becomes 0.
    documents = [[1, 10, 11, 2], [1, 40, 41, 42, 43, 2], [1, 70, 2]]
    model.calibrate(documents, pad_id=0)
    ids, mask = pad_batch(documents, 0)
    torch.testing.assert_close(model(ids, mask).mean(0), torch.zeros(3), atol=1e-5, rtol=0)


def test_generative_head_needs_a_causal_model() -> None:
    with pytest.raises(InvalidSpec, match=r"stages\.classifier\.head"):
        head_classifier(HeadKind.GENERATIVE, ModelFamily.MASKED)
