"""The emerging-intents benchmark's scoring (benchmarks/emerging_intents.py): when a cluster
finds an intent, purity, the simulated reviewer, and its table. No data set, no training."""

from __future__ import annotations

import numpy as np
import reports
from emerging_intents import found_intents, purity, reviewed


def test_an_intent_is_found_by_a_cluster_it_is_the_majority_of() -> None:
    truth = ["new", "new", "new", "new", "old", "other", "other", "other", "split", "split", "split", "split"]
    clusters = np.array([0, 0, 0, -1, 0, 1, 1, 1, 1, 2, -1, -1])
    found = found_intents(truth, clusters, ["new", "other", "split", "absent"])
    # new: 3 of 4 in cluster 0, its majority; other: 3 of 3 in cluster 1, its majority; split: at
    # best 1 of 4 in a cluster it leads (cluster 2); absent: never captured.
    assert found == {"new": True, "other": True, "split": False, "absent": False}
    assert purity(truth, clusters) == (3 + 3 + 1) / 9


def test_the_reviewer_names_each_cluster_by_its_majority_and_unticks_the_rest() -> None:
    texts = [f"m{i}" for i in range(14)]
    truth = ["a"] * 12 + ["b", "b"]
    clusters = np.array([0] * 14)
    rows = reviewed(texts, truth, clusters)
    assert rows == [(f"m{i}", "a") for i in range(10)]  # at most 10 examples, none of b's
    assert reviewed(texts, truth, np.full(14, -1)) == []  # noise is never named


def test_the_table_states_the_targets() -> None:
    run = {
        "seed": 1,
        "found_count": 9,
        "handoffs": 300,
        "handoffs_held_out": 120,
        "clusters": 14,
        "noise": 90,
        "purity": 0.8,
        "ari": 0.4,
        "seconds": {"warm_start": 100.0, "retrain": 400.0},
        "accuracy": {
            arm: {"old": 0.88, "new": new, "all": 0.85}
            for arm, new in (("served", 0.0), ("warm_start", 0.7), ("retrain", 0.71))
        },
        "drift": {
            "window": 2000,
            "threshold": 0.025,
            "steady_max": 0.02,
            "steady_crossings": 0,
            "shifted_max": 0.05,
            "crossed_after": 700,
        },
    }
    text = reports.render("emerging_intents", {"machine": "test", "runs": {"1": run}})
    assert "| held-out intents found (of 10) | 9.0 ± 0.0 | 9 | ≥ 8: met |" in text
    assert "≤ 120 each: met" in text and "≥ −3.0: met" in text and "| 700 |" in text
