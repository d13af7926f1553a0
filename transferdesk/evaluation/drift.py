"""Drift of live traffic from a model version's validation data, over a rolling window of its
last messages: the hand-off rate by reason, the out-of-scope rate, the mean confidence, and the
Jensen–Shannon divergence of the live mix of decisions (the top-1 intent, or the out-of-scope
label) from the mix the version decided on its validation rows (`intent_mix`, recorded by
training in metrics.json's `calibration`).

Free of Ray: the Serve Ingress keeps one `DriftWindow` per model version (deployments/drift.py),
and a benchmark replays a stream through one.

The window counts messages, not seconds. A sample's divergence from the distribution it was
drawn from is not zero: about (K − 1) / (8 ln 2) × (1/W + 1/N) bits for K categories, W live
messages and N validation rows (`null_divergence` simulates it). A fixed number of messages
gives a fixed noise floor, so one alert threshold holds at any traffic; a window of minutes
would hold a few messages at night (noise over the threshold) and thousands at peak.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np


def intent_mix(decided: Iterable[str]) -> dict[str, float]:
    """The share of each label among decisions (top-1 intents and the out-of-scope label)."""
    counts = Counter(decided)
    total = sum(counts.values())
    return {label: n / total for label, n in sorted(counts.items())} if total else {}


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen–Shannon divergence in bits (0: the same mix; 1: no label in common) between counts
    or shares along the last axis, each normalised; rows broadcast. scipy's `jensenshannon` is
    the square root of this (a distance), one pair at a time."""
    p = p / p.sum(axis=-1, keepdims=True)
    q = q / q.sum(axis=-1, keepdims=True)
    m = (p + q) / 2
    return (_kl_bits(p, m) + _kl_bits(q, m)) / 2


def _kl_bits(a: np.ndarray, m: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):  # 0 · log 0 is 0; m > 0 wherever a > 0
        return np.where(a > 0, a * np.log2(a / m), 0.0).sum(axis=-1)


def null_divergence(
    reference: Mapping[str, float],
    window: int,
    reference_rows: int | None = None,
    quantile: float = 0.999,
    draws: int = 4000,
    seed: int = 0,
) -> float:
    """The divergence that unchanged traffic reaches in a `quantile` of windows: windows of
    `window` messages drawn from the reference mix itself, compared with the reference, itself
    counted from `reference_rows` validation rows drawn alike (None: the exact mix, no noise
    of its own). An alert threshold below it fires on noise."""
    rng = np.random.default_rng(seed)
    shares = np.array(list(reference.values()), dtype=float)
    shares /= shares.sum()
    live = rng.multinomial(window, shares, size=draws).astype(float)
    ref = rng.multinomial(reference_rows, shares, size=draws).astype(float) if reference_rows else shares
    return float(np.quantile(js_divergence(live, ref), quantile))


@dataclass(frozen=True)
class DriftFigures:
    """A window's figures. Rates are shares (0–1); the hand-off rates are of the routed
    messages (a routing decision: /v1/route), the others of all messages."""

    messages: int
    routed: int
    out_of_scope_rate: float
    mean_confidence: float
    handoff_rates: dict[str, float]  # reason → share of routed messages handed off for it
    divergence: float | None  # None: no reference mix, or fewer messages than the window holds


class DriftWindow:
    """The last `size` messages of one model version, counted as they come: adding one is a
    few dictionary updates (no loop over intents); `figures` does the arithmetic, so call it
    when exporting, not per message. Not thread-safe: one owner adds and reads (the Ingress's
    event loop)."""

    def __init__(self, size: int, reference: Mapping[str, float] | None = None) -> None:
        if size < 1:
            raise ValueError(f"a window holds at least one message, not {size}")
        self.size = size
        self.reference = reference
        # (label, confidence, out_of_scope, routed, hand-off reason): what to take back out.
        self._messages: deque[tuple[str, float, bool, bool, str | None]] = deque()
        self._labels: Counter[str] = Counter()
        self._reasons: Counter[str] = Counter()
        self._confidence = 0.0
        self._out_of_scope = 0
        self._routed = 0

    @property
    def reference(self) -> Mapping[str, float] | None:
        return self._reference

    @reference.setter
    def reference(self, mix: Mapping[str, float] | None) -> None:
        """The validation mix to compare with (None: the divergence is not computed)."""
        self._reference = mix
        # Fixed order, arrays built once: `figures` only looks the live counts up.
        self._categories = sorted(mix) if mix else []
        self._shares = np.array([mix[c] for c in self._categories], dtype=float) if mix else None

    def __len__(self) -> int:
        return len(self._messages)

    def add(
        self,
        label: str,
        confidence: float,
        out_of_scope: bool,
        routed: bool = False,
        handoff_reason: str | None = None,
    ) -> None:
        """One message: its decided label (the top intent, or the out-of-scope label), its top
        intent's confidence, the model's out-of-scope verdict, whether it was routed and, if
        routing handed it to people, why (the decision's `reason`)."""
        if len(self._messages) == self.size:
            self._count(*self._messages.popleft(), sign=-1)
        item = (label, confidence, out_of_scope, routed, handoff_reason if routed else None)
        self._messages.append(item)
        self._count(*item, sign=1)

    def _count(
        self, label: str, confidence: float, out_of_scope: bool, routed: bool, reason: str | None, sign: int
    ) -> None:
        self._labels[label] += sign
        self._confidence += sign * confidence
        self._out_of_scope += sign * out_of_scope
        self._routed += sign * routed
        if reason is not None:
            self._reasons[reason] += sign

    def figures(self) -> DriftFigures:
        n, routed = len(self._messages), self._routed
        return DriftFigures(
            messages=n,
            routed=routed,
            out_of_scope_rate=self._out_of_scope / n if n else 0.0,
            # A running sum loses the last bits as messages come and go; clamp them away.
            mean_confidence=min(max(self._confidence / n, 0.0), 1.0) if n else 0.0,
            handoff_rates={r: k / routed for r, k in sorted(self._reasons.items())} if routed else {},
            divergence=self.divergence() if n == self.size else None,
        )

    def divergence(self) -> float | None:
        """The window's divergence from the reference mix, whatever its fill (None without a
        reference or a message)."""
        if self._shares is None or not self._messages:
            return None
        live = [self._labels.get(c, 0) for c in self._categories]
        # Labels the validation rows never got (an intent never predicted there): a share of
        # the live mix with none of the reference's.
        unseen = len(self._messages) - sum(live)
        p = np.array([*live, unseen], dtype=float)
        q = np.append(self._shares, 0.0)
        return float(js_divergence(p, q))
