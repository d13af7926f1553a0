"""Drift figures of live traffic per model version (`args.drift`), kept by each Ingress
replica and exported through Ray's metrics endpoint: the hand-off rate by reason, the
out-of-scope rate, the mean confidence and the divergence of the live mix of decisions from
the version's validation mix (transferdesk/evaluation/drift.py).

The Ingress sees every answer in both topologies, with the version that gave it and, for
/v1/route, the routing decision. A message costs a few dictionary updates; the figures are
computed and the gauges set at most every `export_interval_s`, on a request. A version's
validation mix comes from the classifier that loaded it (`Classifier.references`), asked in
the background once the Ingress has seen the version answer; a version trained before the mix
was recorded has no divergence, its other figures are exported all the same.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import TypedDict

from deployments.config import DriftSettings
from transferdesk.evaluation.drift import DriftWindow, null_divergence
from transferdesk.model.prediction import Prediction

log = logging.getLogger("ray.serve")


class Reference(TypedDict):
    """A version's validation mix of decisions and the rows it was counted on (None where
    training did not record it: an older version)."""

    mix: dict[str, float]
    rows: int | None


# The classifier's answer: each version it serves, and its reference (None: it has none).
References = Callable[[], Awaitable[dict[str, Reference | None]]]
# The exported gauges (Ray prefixes `ray_`), by figure: what k8s/render.py's alerts read.
GAUGES = {
    "handoff_rate": "transferdesk_handoff_rate",
    "out_of_scope_rate": "transferdesk_out_of_scope_rate",
    "mean_confidence": "transferdesk_mean_confidence",
    "divergence": "transferdesk_intent_divergence",
    "messages": "transferdesk_drift_window_messages",
}


class DriftMonitor:
    """One DriftWindow per model version that answered through this Ingress replica, and the
    gauges they set. Driven from the Ingress's event loop alone."""

    def __init__(self, settings: DriftSettings, references: References) -> None:
        from ray.serve.metrics import Gauge

        self.settings, self.references = settings, references
        self.windows: dict[str, DriftWindow] = {}
        self.known: dict[str, Reference | None] = {}  # versions the classifier described
        self.exported = float("-inf")  # the first request exports: the gauges appear at once
        self.asking: asyncio.Task | None = None
        tags = ("model_version",)
        about = f"over the version's last {settings.window} messages (args.drift.window), per Ingress replica"
        self.gauges = {
            "handoff_rate": Gauge(
                GAUGES["handoff_rate"],
                description=f"Share of routed messages handed to people, by reason, {about}.",
                tag_keys=(*tags, "reason"),
            ),
            "out_of_scope_rate": Gauge(
                GAUGES["out_of_scope_rate"],
                description=f"Share of messages below the out-of-scope threshold, {about}.",
                tag_keys=tags,
            ),
            "mean_confidence": Gauge(
                GAUGES["mean_confidence"],
                description=f"Mean calibrated confidence of the top intent, {about}.",
                tag_keys=tags,
            ),
            "divergence": Gauge(
                GAUGES["divergence"],
                description="Jensen-Shannon divergence (bits) of the decisions' mix from the version's "
                f"validation mix, {about}; once the window is full, for versions that recorded the mix.",
                tag_keys=tags,
            ),
            "messages": Gauge(GAUGES["messages"], description="Messages in the drift window.", tag_keys=tags),
        }

    def observe(
        self, versions: list[str], predictions: list[Prediction], decisions: list[dict] | None
    ) -> None:
        """A request's answers (and routing decisions, for /v1/route), from the request path."""
        for i, (version, prediction) in enumerate(zip(versions, predictions, strict=True)):
            window = self.windows[version] if version in self.windows else self._window(version)
            decision = decisions[i] if decisions is not None else None
            window.add(
                prediction.label,
                prediction.confidence,
                prediction.out_of_scope,
                routed=decision is not None,
                handoff_reason=decision["reason"] if decision is not None and decision["handoff"] else None,
            )
        if time.monotonic() - self.exported >= self.settings.export_interval_s:
            self.export()

    def _window(self, version: str) -> DriftWindow:
        window = self.windows[version] = DriftWindow(self.settings.window, self._mix(version))
        return window

    def _mix(self, version: str) -> dict[str, float] | None:
        reference = self.known.get(version)
        return reference["mix"] if reference else None

    def export(self) -> None:
        """Every window's figures to the gauges; asks the classifier about versions it has not
        described yet."""
        self.exported = time.monotonic()
        if any(v not in self.known for v in self.windows) and (self.asking is None or self.asking.done()):
            self.asking = asyncio.get_running_loop().create_task(self._ask())
        for version, window in self.windows.items():
            figures, tags = window.figures(), {"model_version": version}
            self.gauges["out_of_scope_rate"].set(figures.out_of_scope_rate, tags=tags)
            self.gauges["mean_confidence"].set(figures.mean_confidence, tags=tags)
            self.gauges["messages"].set(figures.messages, tags=tags)
            for reason, rate in figures.handoff_rates.items():
                self.gauges["handoff_rate"].set(rate, tags={**tags, "reason": reason})
            if figures.divergence is not None:
                self.gauges["divergence"].set(figures.divergence, tags=tags)

    def status(self) -> dict[str, dict]:
        """Every window's figures now (GET /readyz, with a key)."""
        return {version: asdict(window.figures()) for version, window in self.windows.items()}

    async def _ask(self) -> None:
        try:
            answered = await self.references()
        except Exception as err:  # a classifier busy or gone: asked again at the next export
            log.warning("drift: the classifier did not describe its versions (%s)", type(err).__name__)
            return
        for version, reference in answered.items():
            if version in self.known:
                continue
            self.known[version] = reference
            if version in self.windows:
                self.windows[version].reference = self._mix(version)
            if reference is None:
                log.info("drift: %s recorded no validation mix; no divergence is exported for it", version)
            else:
                await self._check_threshold(version, reference)

    async def _check_threshold(self, version: str, reference: Reference) -> None:
        """Says so when unchanged traffic would cross the alert threshold for this version (many
        intents, few validation rows): the alert would fire on noise."""
        window, alert = self.settings.window, self.settings.divergence_alert
        # In a thread: thousands of simulated windows take a few milliseconds of the event loop.
        noise = await asyncio.to_thread(null_divergence, reference["mix"], window, reference["rows"])
        if noise >= alert:
            log.warning(
                "drift: for %s (%d labels), unchanged traffic reaches a divergence of %.3f in 0.1%% of "
                "windows of %d messages, over the alert threshold %.3f: raise args.drift.divergence_alert "
                "or args.drift.window",
                version,
                len(reference["mix"]),
                noise,
                window,
                alert,
            )
