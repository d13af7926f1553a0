"""The multi-intent benchmark (benchmarks/multi_intent.py): pairs joined as documented, the
found set read as documented, and its table judged against the targets. No data set, no
training."""

from __future__ import annotations

import numpy as np
import reports
from multi_intent import CONNECTIVES, found_set, joined, pairs


def test_pairs_join_messages_of_different_intents_with_each_connective() -> None:
    assert (
        joined("I was charged twice.", "new card please", ". Also, ")
        == "I was charged twice. Also, new card please"
    )
    assert joined("I was charged twice.", "new card please", " ") == "I was charged twice. new card please"
    test = [(f"message {i}", f"intent{i % 3}") for i in range(30)]
    made = pairs(test, np.random.default_rng(0))
    assert len(made) == 200 * len(CONNECTIVES)
    assert all(a != b for _, a, b, _ in made)
    assert {name for *_, name in made} == {name for name, _ in CONNECTIVES}
    assert found_set(None, "x") == {"x"} and found_set([("a", 0.9), ("b", 0.8)], "x") == {"a", "b"}


def test_the_table_judges_the_targets() -> None:
    multi = {
        "exact_set": 0.72,
        "exact_set_by_connective": {"and": 0.75, "space": 0.69},
        "recall": 0.85,
        "single_accuracy_off": 0.87,
        "single_accuracy_on": 0.868,
        "single_split_rate": 0.025,
        "cost_ms": {"single": {"p50": 20.0}, "pair": {"p50": 60.0}},
    }
    comp = {"top": 0.3, "random": 0.1, "ratio": 3.0, "words_mean": 11.0, "cost_ms": {"p50": 40.0}}
    run = {
        "seed": 1,
        "multi_intent": multi,
        "explanations": {"messages": 500, "torch": comp, "onnx-int8": comp},
    }
    text = reports.render("multi_intent", {"machine": "test", "runs": {"1": run}})
    assert "| 72.00 ± 0.00 | 72.00 | ≥ 70: met |" in text
    assert "| -0.20 ± 0.00 | -0.20 | ≥ −0.3: met |" in text and "≤ 3: met" in text
    assert "| torch | 0.300 ± 0.000 | 0.100 ± 0.000 | 3.00 ± 0.00 | ≥ 2×: met | 40.0 ± 0.0 | 11.0 |" in text
