"""Drift figures: the default alert threshold against finite-sample noise and a shift to new
intents, and the Ingress's monitor on its own (versions, routing, references, gauges)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from deployments.app import Classifier, Served
from deployments.config import DriftSettings
from deployments.drift import DriftMonitor
from tests.deployments.conftest import train_versions, write_policy
from transferdesk.evaluation.drift import js_divergence, null_divergence
from transferdesk.model.prediction import Prediction

V1, V2 = "toy/v1", "toy/v2"
SURE = Prediction("track_order", 0.9, False, "track_order", (("track_order", 0.9),))
OOS = Prediction("track_order", 0.3, True, "oos", (("track_order", 0.3),))
MIX = {"track_order": 0.8, "oos": 0.2}


def _mix(intents: int, oos: float) -> dict[str, float]:
    return {**{f"intent_{i}": (1 - oos) / intents for i in range(intents)}, "oos": oos}


def test_the_default_threshold_clears_unchanged_traffic_and_a_20_percent_shift_crosses_it() -> None:
    """The calibration case of the default (docs/operations.md#drift): 69 intents and the
    out-of-scope label, a reference counted on 1,500 validation rows, the default window."""
    drift = DriftSettings()
    reference, rows = _mix(69, 0.1), 1500
    noise = null_divergence(reference, drift.window, rows, quantile=0.999, draws=20000)
    assert 0.9 * drift.divergence_alert < noise < drift.divergence_alert  # over it, not far over
    # 20% of the traffic from intents the model never learnt: 40% of those handed off as
    # out-of-scope, the rest taken for 15 look-alike intents.
    rng = np.random.default_rng(7)
    shares = np.array(list(reference.values()))
    novel = np.zeros_like(shares)
    novel[-1] = 0.4
    novel[rng.choice(69, 15, replace=False)] = 0.6 / 15
    validation = rng.multinomial(rows, shares, size=2000).astype(float)
    windows = rng.multinomial(drift.window, 0.8 * shares + 0.2 * novel, size=2000).astype(float)
    assert (js_divergence(windows, validation) > drift.divergence_alert).mean() > 0.85  # measured: 0.89


class Gauge:
    """Stands in for Ray's: the last value set per tag set."""

    def __init__(self) -> None:
        self.values: dict[tuple, float] = {}

    def set(self, value: float, tags: dict[str, str]) -> None:
        self.values[tuple(sorted(tags.items()))] = value

    def get(self, **tags: str) -> float | None:
        return self.values.get(tuple(sorted(tags.items())))


def _monitor(references: dict) -> DriftMonitor:
    async def ask() -> dict:
        return references

    monitor = DriftMonitor(DriftSettings(window=100, export_interval_s=300), ask)
    monitor.gauges = {name: Gauge() for name in monitor.gauges}
    return monitor


def _routed(reason: str | None) -> dict:
    return {"handoff": reason is not None, "reason": reason or "intent"}


def test_the_monitor_keeps_a_window_per_version_and_exports_its_figures() -> None:
    monitor = _monitor({V1: {"mix": MIX, "rows": 50}, V2: None})

    async def traffic() -> None:
        monitor.observe([V1], [SURE], None)  # the first request exports, and asks for references
        await monitor.asking
        # a request answered by two versions (a switch mid-way): each message to its own window
        monitor.observe([V1, V2], [OOS, SURE], [_routed("out_of_scope"), _routed(None)])
        for _ in range(98):
            monitor.observe([V1], [SURE], [_routed(None)])
        monitor.export()

    asyncio.run(traffic())
    gauges = monitor.gauges
    assert len(monitor.windows[V1]) == 100 and len(monitor.windows[V2]) == 1
    assert gauges["out_of_scope_rate"].get(model_version=V1) == pytest.approx(0.01)
    assert gauges["mean_confidence"].get(model_version=V1) == pytest.approx((99 * 0.9 + 0.3) / 100)
    # of the 99 routed messages (the first was classified, not routed)
    assert gauges["handoff_rate"].get(model_version=V1, reason="out_of_scope") == pytest.approx(1 / 99)
    assert gauges["messages"].get(model_version=V2) == 1
    expected = js_divergence(np.array([99.0, 1.0]), np.array([0.8, 0.2]))
    assert gauges["divergence"].get(model_version=V1) == pytest.approx(expected)
    # v2 recorded no validation mix: every figure but the divergence
    assert gauges["divergence"].get(model_version=V2) is None
    assert gauges["mean_confidence"].get(model_version=V2) == pytest.approx(0.9)
    # GET /readyz's view, computed when asked
    assert monitor.status()[V2] == {
        "messages": 1,
        "routed": 1,
        "out_of_scope_rate": 0.0,
        "mean_confidence": 0.9,
        "handoff_rates": {},
        "divergence": None,
    }


def test_figures_are_exported_at_most_every_interval() -> None:
    monitor = _monitor({V1: None})

    async def traffic() -> None:
        monitor.observe([V1], [SURE], None)
        monitor.observe([V1], [OOS], None)  # within export_interval_s of the first: not exported

    asyncio.run(traffic())
    assert monitor.gauges["messages"].get(model_version=V1) == 1
    assert len(monitor.windows[V1]) == 2


def test_a_classifier_that_does_not_answer_is_asked_again(caplog) -> None:
    calls = []

    async def ask() -> dict:
        calls.append(1)
        if len(calls) == 1:
            raise TimeoutError
        return {V1: {"mix": MIX, "rows": 50}}

    monitor = DriftMonitor(DriftSettings(window=100, export_interval_s=300), ask)
    monitor.gauges = {name: Gauge() for name in monitor.gauges}

    async def traffic() -> None:
        monitor.observe([V1], [SURE], None)
        await monitor.asking
        monitor.export()
        await monitor.asking

    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        asyncio.run(traffic())
    assert "did not describe its versions (TimeoutError)" in caplog.text
    assert len(calls) == 2 and monitor.windows[V1].reference == MIX


def test_a_threshold_under_the_versions_own_noise_is_reported(caplog) -> None:
    # 150 intents counted on 300 validation rows: unchanged traffic diverges far past 0.025
    monitor = _monitor({V1: {"mix": _mix(149, 0.1), "rows": 300}})

    async def traffic() -> None:
        monitor.observe([V1], [SURE], None)
        await monitor.asking

    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        asyncio.run(traffic())
    assert "over the alert threshold 0.025: raise args.drift.divergence_alert" in caplog.text


def test_the_classifier_describes_the_versions_it_serves(tmp_path: Path, tiny_backbone: Path) -> None:
    version = train_versions(tmp_path, tiny_backbone)[0]
    policy = write_policy(tmp_path / "policy.yaml")
    classifier = Classifier.func_or_class(str(version), str(policy), threads=1)
    served = classifier.served.version
    calibration = served.metrics["calibration"]
    assert classifier.references() == {
        served.spec: {"mix": calibration["valid_intent_mix"], "rows": calibration["valid_rows"]}
    }
    assert set(calibration["valid_intent_mix"]) <= {*served.labels, "oos"}
    # a version trained before the mix was recorded: no reference, so no divergence
    older = SimpleNamespace(metrics={"calibration": {"fitted_temperature": 1.0}})
    assert Served(classifier.served.model, older, "auto").reference() is None
