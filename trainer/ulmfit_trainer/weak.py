"""Weak supervision for co-training, as pure functions: labeling rules, votes and their agreement,
per-class caps and class balance. No torch; the cotrain stage does the I/O around these.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ulmfit_trainer.config import LabelingRule


@dataclass(frozen=True)
class CompiledRule:
    """One labeling rule as a single case-insensitive regex."""

    label: str
    regex: re.Pattern[str]

    def matches(self, text: str) -> bool:
        return self.regex.search(text) is not None


def _keyword_regex(keyword: str) -> str:
    # Lookarounds instead of \b, so keywords that start or end in a symbol ("c++", ".net") still
    # match as whole words.
    return rf"(?<!\w){re.escape(keyword)}(?!\w)"


def compile_rules(rules: Sequence[LabelingRule]) -> list[CompiledRule]:
    compiled = []
    for rule in rules:
        parts = [_keyword_regex(k) for k in rule.keywords] + [f"(?:{p})" for p in rule.patterns]
        compiled.append(CompiledRule(rule.label, re.compile("|".join(parts), re.IGNORECASE)))
    return compiled


def rule_votes(text: str, rules: Sequence[CompiledRule]) -> Counter[str]:
    """How many rules of each label match ``text``."""
    return Counter(rule.label for rule in rules if rule.matches(text))


def weak_label(text: str, rules: Sequence[CompiledRule]) -> str | None:
    """The label with the most matching rules; None when no rule matches or the top is a tie."""
    ranked = rule_votes(text, rules).most_common(2)
    if not ranked or (len(ranked) == 2 and ranked[0][1] == ranked[1][1]):
        return None
    return ranked[0][0]


@dataclass(frozen=True)
class Vote:
    """One model's prediction for one pool document."""

    label: str
    confidence: float


@dataclass(frozen=True)
class PseudoLabel:
    label: str
    confidence: float
    """Mean confidence of the models that agreed."""
    votes: int
    """How many models agreed (each with confidence at least the threshold)."""


def agreement(
    votes_by_model: Sequence[Mapping[str, Vote]], min_agreement: int, min_confidence: float
) -> dict[str, PseudoLabel]:
    """Documents on which at least ``min_agreement`` models predict one label with confidence at
    least ``min_confidence``. A document where two labels both reach the quorum is left out."""
    confident: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for votes in votes_by_model:
        for doc, vote in votes.items():
            if vote.confidence >= min_confidence:
                confident[doc][vote.label].append(vote.confidence)
    accepted = {}
    for doc, by_label in confident.items():
        winners = [(label, c) for label, c in by_label.items() if len(c) >= min_agreement]
        if len(winners) == 1:
            label, confidences = winners[0]
            accepted[doc] = PseudoLabel(
                label, sum(confidences) / len(confidences), len(confidences)
            )
    return accepted


def _most_confident_first(
    items: Iterable[tuple[str, PseudoLabel]],
) -> list[tuple[str, PseudoLabel]]:
    # More agreeing models first, then higher confidence; the document id breaks ties so the
    # result never depends on dict order.
    return sorted(items, key=lambda item: (-item[1].votes, -item[1].confidence, item[0]))


def cap_per_class(accepted: Mapping[str, PseudoLabel], limit: int | None) -> dict[str, PseudoLabel]:
    """At most ``limit`` documents per label, the most confident ones."""
    if limit is None:
        return dict(accepted)
    kept: dict[str, PseudoLabel] = {}
    taken: Counter[str] = Counter()
    for doc, pseudo in _most_confident_first(accepted.items()):
        if taken[pseudo.label] < limit:
            kept[doc] = pseudo
            taken[pseudo.label] += 1
    return kept


def balance_classes(
    accepted: Mapping[str, PseudoLabel], factor: float | None
) -> dict[str, PseudoLabel]:
    """No label keeps more than ``factor`` times the documents of the rarest accepted label."""
    if factor is None or not accepted:
        return dict(accepted)
    rarest = min(Counter(p.label for p in accepted.values()).values())
    return cap_per_class(accepted, max(1, int(factor * rarest)))


def select_pseudo_labels(
    votes_by_model: Sequence[Mapping[str, Vote]],
    *,
    min_agreement: int,
    min_confidence: float,
    max_per_class: int | None,
    balance: float | None,
) -> dict[str, PseudoLabel]:
    """Agreement, then the per-class cap, then class balance."""
    accepted = agreement(votes_by_model, min_agreement, min_confidence)
    return balance_classes(cap_per_class(accepted, max_per_class), balance)


def accuracy(predicted: Mapping[str, str], gold: Mapping[str, str]) -> tuple[int, int]:
    """(correct, compared): over the documents that have both a prediction and a gold label."""
    compared = [doc for doc in predicted if doc in gold]
    return sum(predicted[doc] == gold[doc] for doc in compared), len(compared)
