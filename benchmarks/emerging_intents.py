"""Emerging intents on BANKING77 10-shot: intents the served model never saw, found among its
hand-offs, added by a warm start, and seen coming by the drift figures.

    python benchmarks/emerging_intents.py              # seeds 1 2 3 (about 45 min on 2 cores)
    python benchmarks/emerging_intents.py --seeds 1    # one seed

Per seed, in a process of its own:

1. Ten intents, chosen with the seed, are held out; the default recipe trains on the other 67
   intents' 10-shot rows (`banking77/train_10.csv`), validating on theirs (`valid.csv`).
2. Half of `test.csv` (all 77 intents, shuffled with the seed) arrives as live traffic: the
   model predicts each message and the routing code the service runs (deployments/routing.py,
   a policy with min_confidence 0.5 like the shipped one) decides; the hand-offs (out of scope,
   low confidence) are what the service captures for the clustering.
3. The hand-offs are clustered as `transferdesk review clusters` does (review/clusters.py,
   default settings). A held-out intent is found when at least half of its captured messages
   are in one cluster whose majority it is. Purity and the adjusted Rand index (noise counted
   as one group) score the clustering against the true labels.
4. A simulated reviewer names every cluster with its majority label and keeps up to 10 of its
   messages of that label as examples (unticking the others). The intents are added by the
   warm start (`--from` the served version, the examples as `data.extra_train`) and by a full
   retrain of the default recipe on the same data.
5. The other half of the test set scores the served model, the warm start and the retrain
   (top intent, no threshold): accuracy on the old intents' rows, on the held-out ones', and
   overall; and the wall time of each training command.

Drift: the served model's decisions on the scored half replayed through the service's drift
window (evaluation/drift.py, its default window and alert threshold from deployments/config.py):
a stream of the old intents alone (the validation mix) must stay under the threshold; one where
the held-out intents arrive at 20% of traffic after the first window must cross it within one
window.

Reads ../shared/data (override with --data-dir), writes results/emerging_intents.{json,md}.
"""

from __future__ import annotations

import csv
import time
from collections import Counter
from pathlib import Path

import harness
import numpy as np

HELD_OUT = 10
EXAMPLES = 10  # per named cluster, at most
MIN_CONFIDENCE = 0.5  # the shipped policy's (deployments/policies/northwind.yaml)
SHIFT_SHARE = 0.2  # share of held-out intents' messages after the shift


def _read(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [(row["text"], row["label"]) for row in csv.DictReader(f)]


def _write(path: Path, rows: list[tuple[str, str]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(("text", "label"))
        writer.writerows(rows)
    return str(path)


def found_intents(truth: list[str], clusters: np.ndarray, intents: list[str]) -> dict[str, bool]:
    """Whether a cluster finds each intent: half its captured messages or more in one cluster
    whose majority it is."""
    majority = {
        c: Counter(t for t, k in zip(truth, clusters, strict=True) if k == c).most_common(1)[0][0]
        for c in set(clusters.tolist()) - {-1}
    }
    out = {}
    for intent in intents:
        mine = [k for t, k in zip(truth, clusters, strict=True) if t == intent]
        best = Counter(k for k in mine if k != -1 and majority[k] == intent).most_common(1)
        out[intent] = bool(mine) and bool(best) and best[0][1] >= len(mine) / 2
    return out


def purity(truth: list[str], clusters: np.ndarray) -> float | None:
    """Share of the clustered messages (noise left out) of their cluster's majority label."""
    clustered = [(t, k) for t, k in zip(truth, clusters, strict=True) if k != -1]
    if not clustered:
        return None
    by_cluster: dict[int, Counter] = {}
    for t, k in clustered:
        by_cluster.setdefault(k, Counter())[t] += 1
    return sum(c.most_common(1)[0][1] for c in by_cluster.values()) / len(clustered)


def reviewed(texts: list[str], truth: list[str], clusters: np.ndarray) -> list[tuple[str, str]]:
    """The simulated reviewer: each cluster named by its majority label, up to EXAMPLES of its
    messages of that label kept (the others unticked)."""
    rows = []
    for c in sorted(set(clusters.tolist()) - {-1}):
        members = [i for i, k in enumerate(clusters) if k == c]
        name = Counter(truth[i] for i in members).most_common(1)[0][0]
        rows += [(texts[i], name) for i in members if truth[i] == name][:EXAMPLES]
    return rows


def accuracies(model: object, rows: list[tuple[str, str]], held: set[str]) -> dict[str, float]:
    """Top-intent accuracy (no threshold) on the old intents' rows, the held-out ones', all."""
    predictions = model.predict([t for t, _ in rows], k=1)
    hits = [p.intent == label for p, (_, label) in zip(predictions, rows, strict=True)]
    new = [h for h, (_, label) in zip(hits, rows, strict=True) if label in held]
    old = [h for h, (_, label) in zip(hits, rows, strict=True) if label not in held]
    return {"old": float(np.mean(old)), "new": float(np.mean(new)), "all": float(np.mean(hits))}


def drift(model: object, reference: dict, rows: list[tuple[str, str]], held: set[str], seed: int) -> dict:
    """The served model's decisions replayed through the drift window: a stream of the old
    intents, and one shifted to SHIFT_SHARE held-out messages after its first window."""
    from deployments.config import DriftSettings
    from transferdesk.evaluation.drift import DriftWindow

    settings = DriftSettings()
    window, threshold = settings.window, settings.divergence_alert
    rng = np.random.default_rng(seed)
    predictions = model.predict([t for t, _ in rows], k=1)
    old = [p for p, (_, label) in zip(predictions, rows, strict=True) if label not in held]
    new = [p for p, (_, label) in zip(predictions, rows, strict=True) if label in held]
    length = 4 * window

    def replay(shifted: bool) -> list[float]:
        stream = DriftWindow(window, reference)
        seen = []
        for i in range(length):
            pool = new if shifted and i >= window and rng.random() < SHIFT_SHARE else old
            p = pool[rng.integers(len(pool))]
            stream.add(p.label, p.confidence, p.out_of_scope)
            seen.append(stream.figures().divergence)
        return seen

    steady, shifted = replay(False), replay(True)
    crossed = next((i - window for i, d in enumerate(shifted) if i >= window and d and d > threshold), None)
    return {
        "window": window,
        "threshold": threshold,
        "steady_max": max(d for d in steady if d is not None),
        "steady_crossings": sum(1 for d in steady if d is not None and d > threshold),
        "shifted_max": max(d for d in shifted if d is not None),
        "crossed_after": crossed,  # messages after the shift began; None: never
    }


def run_one(_: str, seed: int, data: Path, work: Path) -> dict:
    from sklearn.metrics import adjusted_rand_score

    from deployments.routing import Route, RoutingPolicy, decide
    from transferdesk.config import load_config
    from transferdesk.model.modeling import IntentModel
    from transferdesk.review.clusters import cluster_embeddings
    from transferdesk.review.config import ClusterSettings
    from transferdesk.training.train import train_and_register

    rng = np.random.default_rng(seed)
    train, valid = _read(data / "banking77/train_10.csv"), _read(data / "banking77/valid.csv")
    test = _read(data / "banking77/test.csv")
    intents = sorted({label for _, label in train})
    held = set(rng.choice(intents, HELD_OUT, replace=False).tolist())
    order = rng.permutation(len(test))
    live, scored = [test[i] for i in order[: len(test) // 2]], [test[i] for i in order[len(test) // 2 :]]
    here = work / f"seed{seed}"
    settings = {
        "data.train": _write(here / "train.csv", [r for r in train if r[1] not in held]),
        "data.valid": _write(here / "valid.csv", [r for r in valid if r[1] not in held]),
        "output": str(here / "registry"),
        "name": "banking77-67",
        "runtime.seed": seed,
    }

    def timed_train(**more: object) -> tuple[object, float]:
        start = time.perf_counter()
        version = train_and_register(load_config(None, {**settings, **more}))
        return version, time.perf_counter() - start

    parent, parent_seconds = timed_train()
    served = IntentModel.from_pretrained(parent)
    policy = RoutingPolicy(
        version="benchmark",
        min_confidence=MIN_CONFIDENCE,
        fallback=Route(destination="agents"),
        default=Route(destination="queue"),
    )
    reasons = set(ClusterSettings().reasons)
    captured = [
        row
        for row, p in zip(live, served.predict([t for t, _ in live], k=1), strict=True)
        if (d := decide(policy, p, 0))["handoff"] and d["reason"] in reasons
    ]
    texts, truth = [t for t, _ in captured], [label for _, label in captured]
    start = time.perf_counter()
    clusters = cluster_embeddings(served.embed(texts), ClusterSettings())
    cluster_seconds = time.perf_counter() - start
    found = found_intents(truth, clusters, sorted(held))
    examples = _write(here / "reviewed.csv", reviewed(texts, truth, clusters))
    warm, warm_seconds = timed_train(
        **{"data.extra_train": [examples], "warm_start.parent": str(parent.path)}
    )
    full, full_seconds = timed_train(**{"data.extra_train": [examples]})
    scores = {
        name: accuracies(IntentModel.from_pretrained(version), scored, held)
        for name, version in (("served", parent), ("warm_start", warm), ("retrain", full))
    }
    added = warm.metrics["warm_start"]["added"]
    return {
        "seed": seed,
        "held_out": sorted(held),
        "live_messages": len(live),
        "handoffs": len(captured),
        "handoffs_held_out": sum(label in held for label in truth),
        "held_out_live": sum(label in held for _, label in live),
        "clusters": len(set(clusters.tolist()) - {-1}),
        "noise": int((clusters == -1).sum()),
        "found": found,
        "found_count": sum(found.values()),
        "purity": purity(truth, clusters),
        "ari": float(adjusted_rand_score(truth, clusters)),
        "cluster_seconds": cluster_seconds,
        "examples": sum(1 for _ in open(examples, encoding="utf-8")) - 1,
        "added": added,
        "accuracy": scores,
        "seconds": {"served": parent_seconds, "warm_start": warm_seconds, "retrain": full_seconds},
        "train_seconds": {
            "warm_start": warm.metrics["train_seconds"],
            "retrain": full.metrics["train_seconds"],
        },
        "drift": drift(served, parent.metrics["calibration"]["valid_intent_mix"], scored, held, seed),
        "models": {"served": str(parent.path), "warm_start": str(warm.path), "retrain": str(full.path)},
    }


def main() -> None:
    harness.seeded_main(__doc__, "emerging_intents", __file__, run_one)


if __name__ == "__main__":
    main()
