"""Each loss on a tiny case worked out by hand; class weights and tuned thresholds."""

from __future__ import annotations

import math

import pytest

from tests.harness.parts import require_modules

require_modules("torch")
import torch  # noqa: E402
from ulmfit_trainer.config import ClassifierStageSpec, LossKind  # noqa: E402
from ulmfit_trainer.errors import InvalidSpec  # noqa: E402
from ulmfit_trainer.losses import class_weights, f1, tune_thresholds  # noqa: E402
from ulmfit_trainer.models import classification_loss  # noqa: E402

LN3 = math.log(3.0)
# Softmax of [ln 3, 0, 0] is [3/5, 1/5, 1/5]; of [0, 0, 0] a third each.
SOFTMAX_LOGITS = torch.tensor([[LN3, 0.0, 0.0], [0.0, 0.0, 0.0]])
SOFTMAX_TARGETS = torch.tensor([0, 2])
# Sigmoid of 0 is 1/2, of ln 3 is 3/4.
SIGMOID_LOGITS = torch.tensor([[0.0, LN3]])
SIGMOID_TARGETS = torch.tensor([[1.0, 0.0]])


def close(value: torch.Tensor, expected: float) -> None:
    assert float(value) == pytest.approx(expected, rel=1e-5)


def test_softmax_cross_entropy_by_hand() -> None:
    # -ln(3/5) for the first document, -ln(1/3) for the second.
    loss = classification_loss(LossKind.SOFTMAX, SOFTMAX_LOGITS, SOFTMAX_TARGETS)
    close(loss, (math.log(5 / 3) + LN3) / 2)


def test_softmax_label_smoothing_by_hand() -> None:
    # s = 0.3 over 3 classes: target mass 0.7 + 0.1 on the label, 0.1 on each other class.
    loss = classification_loss(
        LossKind.SOFTMAX, SOFTMAX_LOGITS, SOFTMAX_TARGETS, label_smoothing=0.3
    )
    first = 0.8 * math.log(5 / 3) + 0.1 * math.log(5) + 0.1 * math.log(5)
    second = LN3  # uniform prediction: every class costs ln 3, the weights sum to 1
    close(loss, (first + second) / 2)


def test_softmax_class_weights_by_hand() -> None:
    weights = torch.tensor([2.0, 1.0, 0.5])
    loss = classification_loss(
        LossKind.SOFTMAX, SOFTMAX_LOGITS, SOFTMAX_TARGETS, class_weights=weights
    )
    # A weighted mean: document losses times their class's weight, over the weights' sum.
    close(loss, (2.0 * math.log(5 / 3) + 0.5 * LN3) / 2.5)


def test_sigmoid_binary_cross_entropy_by_hand() -> None:
    loss = classification_loss(LossKind.SIGMOID, SIGMOID_LOGITS, SIGMOID_TARGETS)
    close(loss, (math.log(2) + math.log(4)) / 2)  # -ln(1/2) and -ln(1 - 3/4)
    # Class indices mean one-hot targets.
    close(
        classification_loss(LossKind.SIGMOID, SIGMOID_LOGITS, torch.tensor([0])), 1.5 * math.log(2)
    )


def test_sigmoid_label_smoothing_and_class_weights_by_hand() -> None:
    smoothed = classification_loss(
        LossKind.SIGMOID, SIGMOID_LOGITS, SIGMOID_TARGETS, label_smoothing=0.5
    )
    # Targets become 0.75 and 0.25.
    first = -(0.75 * math.log(0.5) + 0.25 * math.log(0.5))
    second = -(0.25 * math.log(0.75) + 0.75 * math.log(0.25))
    close(smoothed, (first + second) / 2)
    weighted = classification_loss(
        LossKind.SIGMOID, SIGMOID_LOGITS, SIGMOID_TARGETS, class_weights=torch.tensor([3.0, 1.0])
    )
    close(weighted, (3 * math.log(2) + math.log(4)) / 2)


def test_balanced_and_explicit_class_weights() -> None:
    labels = ["a", "b", "c"]
    balanced = ClassifierStageSpec(class_weighting="balanced")
    # N = 4 documents, 3 labels: a (3 documents) 4/9, b (1) 4/3, c (none) stays 1.
    assert class_weights(balanced, labels, ["a", "a", "a", "b"]) == pytest.approx(
        [4 / 9, 4 / 3, 1.0]
    )
    # Multi-label: a label's count is the documents carrying it.
    assert class_weights(balanced, labels, [["a", "b"], ["a"]]) == pytest.approx(
        [2 / 6, 2 / 3, 1.0]
    )
    assert class_weights(ClassifierStageSpec(), labels, ["a"]) is None
    explicit = ClassifierStageSpec(class_weighting="balanced", class_weights={"b": 5.0})
    assert class_weights(explicit, labels, ["a"]) == [1.0, 5.0, 1.0]  # explicit wins
    with pytest.raises(InvalidSpec) as error:
        class_weights(ClassifierStageSpec(class_weights={"zz": 2.0}), labels, ["a"])
    assert "stages.classifier.classWeights" in str(error.value) and "'zz'" in str(error.value)


def test_thresholds_maximise_each_labels_f1() -> None:
    probs = [[0.9, 0.2], [0.4, 0.1], [0.35, 0.3], [0.1, 0.05]]
    targets = [[1, 0], [1, 0], [0, 0], [0, 0]]
    thresholds = tune_thresholds(probs, targets)
    # Label 0: cutting at 0.4 catches both positives and nothing else (F1 1, vs 2/3 at 0.5);
    # label 1 never occurs: 0.5.
    assert thresholds == [0.4, 0.5]
    assert f1([p[0] >= 0.4 for p in probs], [True, True, False, False]) == 1.0
    assert f1([p[0] >= 0.5 for p in probs], [True, True, False, False]) == pytest.approx(2 / 3)
    assert tune_thresholds([], []) == []
