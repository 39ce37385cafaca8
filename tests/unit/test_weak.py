"""Weak supervision's pure parts: rule matching, votes, agreement, per-class caps, balance."""

from __future__ import annotations

import pytest
from ulmfit_trainer.config import LabelingRule
from ulmfit_trainer.weak import (
    PseudoLabel,
    Vote,
    accuracy,
    agreement,
    balance_classes,
    cap_per_class,
    compile_rules,
    rule_votes,
    select_pseudo_labels,
    weak_label,
)


def rules(*specs: tuple[str, list[str]], patterns: dict[str, list[str]] | None = None):
    made = [LabelingRule(label=label, keywords=words) for label, words in specs]
    made += [LabelingRule(label=label, patterns=p) for label, p in (patterns or {}).items()]
    return compile_rules(made)


def test_keywords_match_whole_words_case_insensitively() -> None:
    compiled = rules(("games", ["game"]), ("devel", ["C++", "compiler"]))
    assert weak_label("A GAME of chess", compiled) == "games"
    assert weak_label("endgame analysis", compiled) is None  # not a whole word
    assert weak_label("games galore", compiled) is None  # "games" is another word
    assert weak_label("a C++ Compiler suite", compiled) == "devel"
    assert weak_label("c++11 features", compiled) is None  # "c++" followed by a word char
    assert weak_label("nothing here", compiled) is None


def test_regex_patterns_are_searched_case_insensitively() -> None:
    compiled = rules(patterns={"net": [r"\bhttps?\b", r"TCP/IP"]})
    assert weak_label("serves HTTP requests", compiled) == "net"
    assert weak_label("a tcp/ip stack", compiled) == "net"
    assert weak_label("httpd", compiled) is None


def test_the_label_with_most_matching_rules_wins_and_ties_give_no_label() -> None:
    compiled = rules(("sound", ["audio"]), ("sound", ["music"]), ("games", ["game"]))
    assert rule_votes("a music game with audio", compiled) == {"sound": 2, "games": 1}
    assert weak_label("a music game with audio", compiled) == "sound"
    assert weak_label("a music game", compiled) is None  # 1 : 1
    # One rule matching several of its keywords is still one vote.
    one_rule = rules(("sound", ["audio", "music"]), ("games", ["game"]))
    assert weak_label("audio music game", one_rule) is None


def votes(**by_doc: tuple[str, float]) -> dict[str, Vote]:
    return {doc: Vote(label, conf) for doc, (label, conf) in by_doc.items()}


def test_agreement_needs_enough_confident_models_on_one_label() -> None:
    a = votes(d1=("x", 0.95), d2=("x", 0.95), d3=("x", 0.95), d4=("x", 0.99))
    b = votes(d1=("x", 0.91), d2=("y", 0.95), d3=("x", 0.5), d4=("x", 0.97))
    accepted = agreement([a, b], min_agreement=2, min_confidence=0.9)
    assert set(accepted) == {"d1", "d4"}  # d2 disagrees, d3 has one unconfident vote
    assert accepted["d1"] == PseudoLabel("x", pytest.approx(0.93), 2)
    assert accepted["d4"].confidence == pytest.approx(0.98)
    # One model suffices with min_agreement 1 - unless two models confidently disagree.
    single = agreement([a, b], min_agreement=1, min_confidence=0.9)
    assert set(single) == {"d1", "d3", "d4"}
    assert single["d3"] == PseudoLabel("x", 0.95, 1)


def test_agreement_threshold_is_inclusive() -> None:
    a, b = votes(d=("x", 0.9)), votes(d=("x", 0.9))
    assert "d" in agreement([a, b], 2, 0.9)
    assert agreement([a, b], 2, 0.900001) == {}


def accepted_of(**by_doc: tuple[str, float, int]) -> dict[str, PseudoLabel]:
    return {doc: PseudoLabel(label, conf, n) for doc, (label, conf, n) in by_doc.items()}


def test_cap_keeps_the_most_confident_per_class() -> None:
    accepted = accepted_of(
        a=("x", 0.91, 2), b=("x", 0.99, 2), c=("x", 0.95, 2), d=("x", 0.80, 3), e=("y", 0.5, 2)
    )
    kept = cap_per_class(accepted, 2)
    assert set(kept) == {"d", "b", "e"}  # more agreeing models rank first, then confidence
    assert cap_per_class(accepted, None) == accepted
    assert cap_per_class(accepted, 10) == accepted


def test_cap_is_deterministic_on_ties() -> None:
    accepted = accepted_of(b=("x", 0.9, 2), a=("x", 0.9, 2), c=("x", 0.9, 2))
    assert set(cap_per_class(accepted, 2)) == {"a", "b"}


def test_balance_limits_every_class_to_a_multiple_of_the_rarest() -> None:
    accepted = {f"x{i}": PseudoLabel("x", 0.9 + i / 1000, 2) for i in range(10)}
    accepted |= {f"y{i}": PseudoLabel("y", 0.95, 2) for i in range(2)}
    balanced = balance_classes(accepted, 3.0)
    counts = {label: sum(p.label == label for p in balanced.values()) for label in "xy"}
    assert counts == {"x": 6, "y": 2}
    assert {d for d in balanced if d.startswith("x")} == {f"x{i}" for i in range(4, 10)}
    assert balance_classes(accepted, None) == accepted
    assert balance_classes({}, 3.0) == {}
    assert len(balance_classes(accepted, 1.5)) == 3 + 2


def test_select_applies_agreement_then_cap_then_balance() -> None:
    a = {f"x{i}": Vote("x", 0.99) for i in range(8)} | {"y0": Vote("y", 0.99), "z0": Vote("z", 0.5)}
    b = dict(a)
    picked = select_pseudo_labels(
        [a, b], min_agreement=2, min_confidence=0.9, max_per_class=5, balance=2.0
    )
    assert sorted(p.label for p in picked.values()) == ["x", "x", "y"]


def test_accuracy_counts_only_documents_with_gold() -> None:
    assert accuracy({"a": "x", "b": "y", "c": "z"}, {"a": "x", "b": "x", "d": "y"}) == (1, 2)
    assert accuracy({}, {"a": "x"}) == (0, 0)
