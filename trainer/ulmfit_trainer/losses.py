"""Loss settings that depend on the data: class weights and tuned decision thresholds.

Pure functions over plain lists (no torch): the classifier stage turns their results into the
tensors ``models.classification_loss`` takes, and the tests check them against hand-worked cases.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from ulmfit_trainer.config import ClassifierStageSpec, ClassWeighting
from ulmfit_trainer.errors import InvalidSpec


def class_weights(
    spec: ClassifierStageSpec, labels: list[str], train_targets: Sequence
) -> list[float] | None:
    """Per-label loss weights in label order, or None when every document counts the same.

    Explicit ``classWeights`` win (labels left out weigh 1); ``balanced`` gives each label
    ``N / (labels x count)`` - N documents, count of those carrying the label - so every class
    carries the same total weight. A label absent from training weighs 1 (nothing to balance).
    """
    if spec.class_weights:
        unknown = sorted(set(spec.class_weights) - set(labels))
        if unknown:
            raise InvalidSpec([(
                "stages.classifier.classWeights", unknown[0],
                f"is not a label of the dataset (labels: {labels})",
            )])  # fmt: skip
        return [float(spec.class_weights.get(label, 1.0)) for label in labels]
    if spec.class_weighting == ClassWeighting.NONE:
        return None
    counts = Counter(
        str(label)
        for target in train_targets
        for label in (target if isinstance(target, list) else [target])
    )
    n = len(train_targets)
    return [n / (len(labels) * counts[label]) if counts[label] else 1.0 for label in labels]


def f1(predicted: Sequence[bool], actual: Sequence[bool]) -> float:
    tp = sum(1 for p, a in zip(predicted, actual, strict=True) if p and a)
    fp = sum(1 for p, a in zip(predicted, actual, strict=True) if p and not a)
    fn = sum(1 for p, a in zip(predicted, actual, strict=True) if a and not p)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def tune_thresholds(
    probabilities: Sequence[Sequence[float]], targets: Sequence[Sequence[float]]
) -> list[float]:
    """Per label, the threshold (predict ``p >= t``) with the best F1 on these examples.

    Candidates are the observed probabilities (each one a distinct cut) and 0.5; ties go to the
    candidate nearest 0.5. A label never present keeps 0.5.
    """
    if not probabilities:
        return []
    thresholds = []
    for label in range(len(probabilities[0])):
        scores = [row[label] for row in probabilities]
        actual = [bool(row[label] >= 0.5) for row in targets]
        if not any(actual):
            thresholds.append(0.5)
            continue
        best, best_f1 = 0.5, -1.0
        for candidate in sorted(set(scores) | {0.5}, key=lambda t: abs(t - 0.5)):
            score = f1([s >= candidate for s in scores], actual)
            if score > best_f1:
                best, best_f1 = candidate, score
        thresholds.append(float(best))
    return thresholds
