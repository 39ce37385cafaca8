"""The classifier stage (ULMFiT stage 3): which examples and hyperparameters it trains with.

Its training set is the gold labels, plus the co-trained models' agreed pseudo-labels
(``cotrain.pseudo_labels``) and augmented copies when the spec asks for them; its
hyperparameters are the spec's, or a finished sweep's best ones (``sweep.apply_best_params``).
The training itself, gradual unfreezing with every phase committed and the last one the
exported model, is ``fitting.fit``.
"""

from __future__ import annotations

from ulmfit_trainer.augment import augment
from ulmfit_trainer.config import ClassifierStageSpec, StageConfig
from ulmfit_trainer.errors import PermanentError
from ulmfit_trainer.stages import Context
from ulmfit_trainer.stages.cotrain import pseudo_labels
from ulmfit_trainer.stages.fitting import Report, TrainingSet, fit
from ulmfit_trainer.stages.sweep import apply_best_params


def run(config: StageConfig, report: Report | None = None) -> dict[str, float]:
    """The classifier stage: gold labels (plus pseudo-labels and augmentation when the spec asks
    for them), trained with gradual unfreezing; the final checkpoint is the exported model."""
    ctx = Context.start(config)
    done = ctx.checkpoints.final(ctx.stage)
    if done is not None:
        return done.meta.get("metrics", {})
    spec = classifier_spec(ctx)
    dataset = ctx.dataset()
    if not dataset.has("train"):
        raise PermanentError(f"dataset {config.data.dataset} has no labeled train split")
    training, about_training = training_set(ctx, dataset, spec)
    _, metrics = fit(ctx, spec, training, report=report, extra_metrics=about_training)
    return metrics


def classifier_spec(ctx: Context) -> ClassifierStageSpec:
    """The stage's hyperparameters, with a finished sweep's best parameters applied."""
    spec = ctx.config.classifier
    assert spec is not None  # StageConfig validates that classifier stages carry it
    if ctx.config.tuned_by:
        spec = apply_best_params(ctx, spec)
    return spec


def training_set(
    ctx: Context, dataset, spec: ClassifierStageSpec
) -> tuple[TrainingSet, dict[str, float]]:
    """Gold labels, then the co-trained pseudo-labels, then augmented copies of the gold ones;
    and metrics about the pseudo-labels (how many per class, their accuracy where known)."""
    training = TrainingSet(dataset.texts("train"), dataset.targets("train"))
    gold, about = training, dict[str, float]()
    if ctx.config.pseudo_labels_from:
        texts, targets, about = pseudo_labels(ctx, ctx.config.pseudo_labels_from)
        training = training.extend(texts, targets)
    if spec.augmentation is not None and spec.augmentation.copies:
        texts, targets = augment(gold.texts, gold.targets, spec.augmentation, ctx.config.seed)
        training = training.extend(texts, targets)
    return training, about
