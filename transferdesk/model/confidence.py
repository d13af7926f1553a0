"""Confidence a contact center can act on: temperature scaling, and the hand-off threshold
chosen on validation data for an operator's stated target, over an out-of-scope score
(scores.py: each score a named component).

Plain numpy over a forward pass's logits and probabilities; the model object (modeling.py)
holds the temperature, the score's name and the threshold, and applies them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal, get_args

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from transferdesk.errors import TransferDeskError

Target = Literal["balance", "handoff_rate", "precision", "oos_recall"]
TARGETS: tuple[str, ...] = get_args(Target)
# Without out-of-scope rows, `balance` hands off this share of in-scope validation messages:
# about one in twenty goes to a human, a conservative default.
DEFAULT_HANDOFF = 0.05
# Reliability diagrams and ECE: equal-width confidence bins (the usual 15, Guo et al. 2017).
ECE_BINS = 15
# Temperatures searched (bounded: a degenerate validation set must not give 0 or infinity).
TEMPERATURE_RANGE = (0.05, 20.0)
# A chosen threshold's target is measured on a sample of validation rows; its interval, at this
# confidence, says what traffic like them could show (Wilson's interval for a proportion).
INTERVAL_CONFIDENCE = 0.95


def scaled_softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    # float64: float32 rounds confidences near 1 to exactly 1, and thresholds need them apart.
    return softmax(logits.astype(np.float64) / temperature, axis=1)


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The temperature that minimises the negative log-likelihood of `targets` (label indices)
    under softmax(logits / T): one parameter, so the ranking of intents never changes. Where
    every row is right the likelihood only grows as T shrinks (no finite best): 1 then."""
    if not len(targets) or (logits.argmax(axis=1) == targets).all():
        return 1.0

    def nll(t: float) -> float:
        return float(-log_softmax(logits / t, axis=1)[np.arange(len(targets)), targets].mean())

    found = minimize_scalar(nll, bounds=TEMPERATURE_RANGE, method="bounded")
    return float(found.x)


def reliability(probs: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Expected calibration error of the top probability, and the per-bin table behind it
    (mean confidence, accuracy, rows) for a reliability diagram."""
    confidence, hit = probs.max(axis=1), probs.argmax(axis=1) == targets
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        rows = which == b
        if rows.any():
            conf, acc = float(confidence[rows].mean()), float(hit[rows].mean())
            ece += rows.mean() * abs(conf - acc)
            table.append(
                {
                    "low": float(edges[b]),
                    "high": float(edges[b + 1]),
                    "confidence": conf,
                    "accuracy": acc,
                    "rows": int(rows.sum()),
                }
            )
    return {"ece": float(ece), "bins": table}


@dataclass(frozen=True)
class OperatingPoint:
    """What a threshold does to a labelled set: the share of in-scope messages handed off, the
    share of all messages handed off, the accuracy of those routed automatically (an
    out-of-scope message routed counts as wrong), and the share of out-of-scope ones handed off
    (None without any). A point chosen for a target also names the measure it was chosen on
    (`target`: balance without out-of-scope rows is a hand-off rate), how many rows measured
    it (`target_rows`) and the INTERVAL_CONFIDENCE interval of its value for traffic like them."""

    threshold: float
    handoff_rate: float
    handoff_all: float
    precision: float
    oos_recall: float | None
    target: str | None = None
    target_rows: int | None = None
    target_interval: tuple[float, float] | None = None

    def value(self, target: str) -> float | None:
        return {
            "handoff_rate": self.handoff_rate,
            "precision": self.precision,
            "oos_recall": self.oos_recall,
        }.get(target)

    def to_dict(self) -> dict:
        point = asdict(self)
        if self.target_rows is None:  # not chosen for a target: a curve's point, a test's
            del point["target"], point["target_rows"], point["target_interval"]
        return point


def operating_point(
    score: np.ndarray, correct: np.ndarray, is_oos: np.ndarray, threshold: float
) -> OperatingPoint:
    """`correct`: the top intent is the row's label (False on out-of-scope rows)."""
    handed = score < threshold
    routed = ~handed
    return OperatingPoint(
        threshold=float(threshold),
        handoff_rate=float(handed[~is_oos].mean()) if (~is_oos).any() else 0.0,
        handoff_all=float(handed.mean()) if len(handed) else 0.0,
        precision=float(correct[routed].mean()) if routed.any() else 1.0,
        oos_recall=float(handed[is_oos].mean()) if is_oos.any() else None,
    )


def choose_threshold(
    score: np.ndarray, correct: np.ndarray, is_oos: np.ndarray, target: str, value: float | None
) -> OperatingPoint:
    """The threshold that meets `target` on validation data, handing off as few messages as it
    can (as many as needed, for oos_recall):

    - balance: the best mean of in-scope accuracy (routed and right) and out-of-scope recall;
      without out-of-scope rows, DEFAULT_HANDOFF of in-scope messages handed off;
    - handoff_rate: at most `value` of in-scope messages handed off;
    - precision: at least `value` of routed messages right;
    - oos_recall: at least `value` of out-of-scope messages handed off.

    An unreachable target raises, saying what is reachable. The point also says how many
    rows measured its target, and the interval of the value for traffic like them (not for
    balance: a mean of two shares)."""
    if target == "balance" and not is_oos.any():
        target, value = "handoff_rate", DEFAULT_HANDOFF
    point = _choose_threshold(score, correct, is_oos, target, value)
    # The rows each target is a share of, and those of them it counts.
    handed = score < point.threshold
    rows, hits = {
        "handoff_rate": (~is_oos, handed & ~is_oos),
        "precision": (~handed, correct & ~handed),
        "oos_recall": (is_oos, handed & is_oos),
    }.get(target, (None, None))
    if rows is None or not rows.any():
        return point
    # Imported here: training needs scipy.stats, the serving processes that import this module do not.
    from scipy.stats import binomtest

    found = binomtest(int(hits.sum()), int(rows.sum())).proportion_ci(INTERVAL_CONFIDENCE, method="wilson")
    interval = (float(found.low), float(found.high))
    return replace(point, target=target, target_rows=int(rows.sum()), target_interval=interval)


def _choose_threshold(
    score: np.ndarray, correct: np.ndarray, is_oos: np.ndarray, target: str, value: float | None
) -> OperatingPoint:
    """The point that meets `target` best, before its interval."""
    # Each distinct score changes a decision; the lowest hands nothing off.
    candidates = np.unique(score)
    if target == "balance":

        def balance(t: float) -> float:
            routed = score >= t
            return float((correct & routed)[~is_oos].mean() + (~routed)[is_oos].mean()) / 2

        return operating_point(score, correct, is_oos, max(candidates, key=balance))
    assert value is not None, "a target other than balance needs a value"
    points = [operating_point(score, correct, is_oos, t) for t in candidates]
    if target == "handoff_rate":
        # Thresholds rise with the rate handed off: the highest one within the allowance.
        return [p for p in points if p.handoff_rate <= value + 1e-12][-1]
    if target == "precision":
        if met := [p for p in points if p.precision >= value - 1e-12]:
            return met[0]
        best = max(points, key=lambda p: p.precision)
        raise TransferDeskError(
            f"no threshold routes messages at precision {value:.3f} on the validation data: the most it "
            f"reaches is {best.precision:.3f}, handing off {best.handoff_all:.1%} of messages; lower the "
            f"target or add training data"
        )
    if not is_oos.any():
        raise TransferDeskError(
            "an oos_recall target needs out-of-scope rows in the validation data; add some, or choose "
            "another target (handoff_rate, precision)"
        )
    return next(p for p in points if p.oos_recall is not None and p.oos_recall >= value - 1e-12)


def handoff_curve(score: np.ndarray, correct: np.ndarray, is_oos: np.ndarray, steps: int = 20) -> list[dict]:
    """Operating points at in-scope hand-off rates 0, 1/steps, …, for choosing one."""
    in_scope = np.sort(score[~is_oos]) if (~is_oos).any() else np.sort(score)
    out = []
    for rate in np.linspace(0.0, 0.95, steps):
        threshold = float(in_scope[min(round(rate * len(in_scope)), len(in_scope) - 1)])
        out.append(operating_point(score, correct, is_oos, threshold).to_dict())
    return out
