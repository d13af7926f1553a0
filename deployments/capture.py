"""Capture of live messages for review (`args.capture`): every message handed to a human
agent, and a random sample of the rest, with the model version, its ranked intents, the
routing decision, a timestamp and the request id.

A request only appends to a bounded in-memory queue; a writer thread redacts personal data
and stores the queue in batches. So capturing adds no store round trip to a request and can
never fail one. A batch leaves the queue only once written: while the store is down, messages
wait (up to `max_pending`; past it, new ones are lost), and a row the store refuses (a value
it cannot hold) is dropped alone while the batch's other rows are written. Every loss is
counted by reason (the metric `transferdesk_capture_messages{outcome=...}` and /readyz),
never raised.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from deployments.config import CaptureSettings
from transferdesk.errors import TransferDeskError
from transferdesk.model.prediction import Prediction
from transferdesk.review.database import RowsRefused, describe
from transferdesk.review.redaction import Redactor
from transferdesk.review.store import Capture, Store

log = logging.getLogger("ray.serve")
RANKED = 5  # intents kept per message: what a reviewer picks from
State = Literal["starting", "ok", "degraded"]
# Why messages are lost: the queue was full; the store refused the row; capture itself failed
# on them (a bug); the replica stopped while the store could not take them.
LOSSES = ("queue_full", "refused", "capture_error", "shutdown")


@dataclass(frozen=True)
class Offered:
    """A message as the request path leaves it: nothing computed, nothing redacted yet."""

    request_id: str
    at: float
    version: str
    text: str
    prediction: Prediction
    reason: str
    destination: str | None


class CaptureWriter:
    """The bounded queue and the thread that drains it into the store."""

    def __init__(self, settings: CaptureSettings, url: str) -> None:
        from ray.serve.metrics import Counter as Metric
        from ray.serve.metrics import Gauge

        self.settings, self.url = settings, url
        self.redactor = Redactor(settings.redaction)
        self.queue: deque[Offered] = deque()
        # A batch taken off the queue and redacted, not written yet (the store was down).
        self.unwritten: list[Capture] = []
        # Every key from the start: /readyz sums the values on the event loop while the writer
        # thread counts, and a key added meanwhile would change the dict's size under it.
        self.written, self.lost = 0, Counter(dict.fromkeys(LOSSES, 0))
        self.state: State = "starting"
        self.error: str | None = None
        self.messages = Metric(
            "transferdesk_capture_messages",
            description="Messages offered to the review capture, by outcome: written, or lost "
            "(queue_full, refused, capture_error, shutdown).",
            tag_keys=("outcome",),
        )
        self.up = Gauge("transferdesk_capture_up", description="1 while the capture store takes writes.")
        self.wake, self.stopping = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, name="capture-writer", daemon=True)
        self.thread.start()

    def offer(
        self,
        request_id: str,
        versions: list[str],
        texts: list[str],
        predictions: list[Prediction],
        decisions: list[dict] | None,
    ) -> None:
        """From the request path: picks what to keep and queues it, in microseconds; never
        raises (a request must not fail for its capture)."""
        try:
            if not len(texts) == len(predictions) == len(versions):  # before any is queued
                raise ValueError(
                    f"{len(texts)} texts, {len(predictions)} predictions, {len(versions)} versions"
                )
            now, rate = time.time(), self.settings.sample_rate
            for i, (text, prediction, version) in enumerate(zip(texts, predictions, versions, strict=True)):
                decision = decisions[i] if decisions is not None else None
                if decision is not None:
                    reason = decision["reason"] if decision["handoff"] else None
                else:  # /v1/classify: no policy, so only the model's own out-of-scope verdict
                    reason = "out_of_scope" if prediction.out_of_scope else None
                if reason is None:
                    if random.random() >= rate:
                        continue
                    reason = "sample"
                if self.pending >= self.settings.max_pending:
                    self._lose("queue_full")
                    continue
                destination = decision["destination"] if decision is not None else None
                self.queue.append(Offered(request_id, now, version, text, prediction, reason, destination))
        except Exception:
            log.exception("capture failed on a request's messages")
            self._lose("capture_error", len(texts))
        if len(self.queue) >= self.settings.batch_size:
            self.wake.set()

    @property
    def pending(self) -> int:
        return len(self.queue) + len(self.unwritten)

    def status(self) -> dict:
        return {
            "state": self.state,
            "store": describe(self.url),
            "written": self.written,
            "lost": sum(self.lost.values()),
            "pending": self.pending,
            "error": self.error,
        }

    def close(self, timeout_s: float = 5.0) -> None:
        """Writes what is queued (within the time given) and stops the thread; what the store
        could not take by then is counted lost (shutdown)."""
        self.stopping.set()
        self.wake.set()
        self.thread.join(timeout_s)
        if not self.thread.is_alive() and self.pending:
            self._lose("shutdown", self.pending)
            self.queue.clear()
            self.unwritten = []

    def _lose(self, why: str, n: int = 1) -> None:
        self.lost[why] += n
        self.messages.inc(n, tags={"outcome": why})

    def _set_state(self, state: State, error: str | None = None) -> None:
        if state != self.state:
            (log.info if state == "ok" else log.error)(
                "capture store %s: %s", state, error or describe(self.url)
            )
        self.state, self.error = state, error
        self.up.set(1 if state == "ok" else 0)

    def _run(self) -> None:
        store: Store | None = None
        migrated = False
        while True:
            self.wake.wait(self.settings.flush_interval_s)
            self.wake.clear()
            stopping = self.stopping.is_set()
            try:
                store = store or Store(self.url)
                if not migrated:  # until the store is reached, messages wait (up to max_pending)
                    store.migrate()  # the first replica creates the tables; the others wait
                    migrated = True
                    self._set_state("ok")
                while self.pending:
                    self._write(store)
            except TransferDeskError as err:  # the store is down: the batch stays queued
                self._set_state("degraded", str(err))
            except Exception as err:  # never let the thread die: capture would stop for good
                self._set_state("degraded", f"{type(err).__name__}: {err}")  # logged once, on change
            if stopping:
                if store is not None:
                    store.close()
                return

    def _write(self, store: Store) -> None:
        """The oldest batch, redacted and written. What the store could not take because it
        is down stays in `unwritten`, redacted, for the next try (the error goes up)."""
        if not self.unwritten:
            batch = [self.queue.popleft() for _ in range(min(self.settings.batch_size, len(self.queue)))]
            self.unwritten = [c for c in map(self._redacted, batch) if c is not None]
        try:
            store.add(self.unwritten)
            self._written(len(self.unwritten))
        except RowsRefused:  # each row alone: one the store cannot hold costs no other
            while self.unwritten:
                try:
                    self._written(store.add(self.unwritten[:1]))
                except RowsRefused as err:
                    log.error("capture: the store refused a message, which is dropped: %s", err)
                    self._lose("refused")
                self.unwritten = self.unwritten[1:]
        except TransferDeskError:
            raise
        except Exception:  # not the store's answer but a bug, which would fail every retry
            log.exception("capture cannot write a batch; its messages are dropped")
            self._lose("capture_error", len(self.unwritten))
        self.unwritten = []
        self._set_state("ok")

    def _written(self, n: int) -> None:
        self.written += n
        self.messages.inc(n, tags={"outcome": "written"})

    def _redacted(self, item: Offered) -> Capture | None:
        """The message as stored, personal data redacted; None (counted) where that fails."""
        try:
            text, found = self.redactor.redact_counts(item.text)
        except Exception:
            log.exception("capture failed on a message; it is dropped")
            self._lose("capture_error")
            return None
        return Capture(
            request_id=item.request_id,
            captured_at=datetime.fromtimestamp(item.at, UTC),
            model_version=item.version,
            text=text,
            ranked=item.prediction.ranked[:RANKED],
            out_of_scope=item.prediction.out_of_scope,
            reason=item.reason,
            destination=item.destination,
            redactions=sum(found.values()),
        )
