"""Capture for review: the writer on its own (sampling, bounds, a store that is down), then end
to end through a real `serve run` into a real PostgreSQL server, which a test stops."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from deployments.capture import CaptureWriter
from deployments.config import CaptureSettings
from tests.conftest import Postgres
from tests.deployments.conftest import UNREACHABLE_STORE, Service, write_policy
from transferdesk.model.prediction import Prediction
from transferdesk.review.store import Store

CARD = "4111 1111 1111 1111"  # passes the Luhn check
V1, V2 = "registry/toy/v1", "registry/toy/v2"
SURE = Prediction("track_order", 0.9, False, "track_order", (("track_order", 0.9), ("reset_password", 0.05)))
UNSURE = Prediction("track_order", 0.3, True, "oos", (("track_order", 0.3), ("reset_password", 0.25)))


def _eventually(check: Callable[[], Any], timeout_s: float = 30, every_s: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (result := check()) and time.monotonic() < deadline:
        time.sleep(every_s)
    return result


def _writer(store: str, **settings: Any) -> CaptureWriter:
    return CaptureWriter(
        CaptureSettings(enabled=True, store=store, **{"flush_interval_s": 0.05, **settings}), store
    )


def test_hand_offs_are_kept_and_the_rest_sampled_at_the_rate(store_url: str) -> None:
    writer = _writer(store_url, sample_rate=0.25)
    texts = [f"message {i} paid with {CARD}" for i in range(400)]
    writer.offer("req-1", [V1] * 400, texts, [SURE] * 400, None)
    writer.offer("req-2", [V1], ["weather on mars"], [UNSURE], None)
    writer.close()
    captured = Store(store_url).pending(limit=1000)
    reasons = [m.reason for m in captured]
    assert reasons.count("out_of_scope") == 1
    assert 60 <= reasons.count("sample") <= 140  # 100 expected; 4 sd of a binomial either side
    assert all("[CARD]" in m.text and CARD not in m.text for m in captured if m.reason == "sample")
    assert all(m.redactions == 1 for m in captured if m.reason == "sample")
    assert writer.status()["state"] == "ok" and writer.status()["lost"] == 0


def test_routing_decisions_give_the_reason_and_the_destination(store_url: str) -> None:
    writer = _writer(store_url, sample_rate=0.0)
    decisions = [
        {"reason": "intent", "handoff": False, "destination": "orders"},
        {"reason": "low_confidence", "handoff": True, "destination": "human-agents"},
    ]
    writer.offer("req-1", [V1, V2], ["where is my parcel", "hm"], [SURE, SURE], decisions)
    writer.close()
    [captured] = Store(store_url).pending()
    assert (captured.text, captured.reason, captured.destination) == ("hm", "low_confidence", "human-agents")
    assert (captured.request_id, captured.model_version) == ("req-1", V2)  # its own version (a canary's)
    assert captured.ranked == [("track_order", 0.9), ("reset_password", 0.05)]


def test_a_store_that_cannot_be_reached_loses_messages_counted_never_raised() -> None:
    writer = _writer(UNREACHABLE_STORE, max_pending=3)
    writer.offer("req-1", [V1] * 5, ["a", "b", "c", "d", "e"], [UNSURE] * 5, None)
    assert writer.status()["lost"] == 2  # past max_pending, at once
    status = _eventually(lambda: writer.status()["state"] == "degraded" and writer.status())
    assert "127.0.0.1:1" in status["error"] and "nothing" in status["store"]
    writer.close()


def test_capture_never_fails_a_request_it_cannot_handle(store_url: str) -> None:
    writer = _writer(store_url)
    writer.offer("req-1", [V1], ["two texts", "one version"], [SURE, SURE], None)  # a mismatch: a bug
    assert writer.lost["capture_error"] == 2 and writer.status()["lost"] == 2
    writer.close()
    assert Store(store_url).pending() == []


def test_one_row_the_store_cannot_hold_costs_no_other(store_url: str) -> None:
    """PostgreSQL refuses NUL in text; the batch's other rows are written all the same."""
    writer = _writer(store_url, flush_interval_s=60)  # one batch, written on close
    texts = [f"parcel {i}" for i in range(20)]
    texts[7] = "a\x00b"
    writer.offer("req-1", [V1] * 20, texts, [UNSURE] * 20, None)
    writer.close()
    stored = {m.text for m in Store(store_url).pending(100)}
    refused = 0 if store_url.startswith("sqlite") else 1  # SQLite keeps NUL
    assert len(stored) == 20 - refused and "parcel 8" in stored and "parcel 6" in stored
    assert writer.lost["refused"] == refused and writer.status()["lost"] == refused
    assert writer.written == 20 - refused


def test_a_store_outage_keeps_the_batch_for_the_next_try(postgres: Postgres) -> None:
    url = postgres.new_database()
    writer = _writer(url)
    writer.offer("req-0", [V1], ["before the outage"], [UNSURE], None)
    assert _eventually(lambda: writer.written == 1)
    postgres.stop()
    try:
        writer.offer("req-1", [V1] * 5, [f"during {i}" for i in range(5)], [UNSURE] * 5, None)
        assert _eventually(lambda: writer.status()["state"] == "degraded")
        assert writer.status()["pending"] == 5 and writer.status()["lost"] == 0
    finally:
        postgres.start()
    assert _eventually(lambda: writer.written == 6), writer.status()
    writer.close()
    assert writer.status()["lost"] == 0 and len(Store(url).pending(100)) == 6


def test_what_the_store_cannot_take_by_shutdown_is_counted() -> None:
    writer = _writer(UNREACHABLE_STORE)
    writer.offer("req-1", [V1] * 3, ["a", "b", "c"], [UNSURE] * 3, None)
    writer.close(timeout_s=10)
    assert writer.lost["shutdown"] == 3 and writer.status()["pending"] == 0


def test_a_full_queue_is_bounded(store_url: str) -> None:
    writer = _writer(store_url, max_pending=10, flush_interval_s=60)
    writer.offer("req-1", [V1] * 25, ["x"] * 25, [UNSURE] * 25, None)
    assert writer.status()["pending"] == 10 and writer.lost["queue_full"] == 15
    writer.close()
    assert len(Store(store_url).pending(100)) == 10  # what was queued is written on close


# -- end to end --------------------------------------------------------------------------------


def _captured(service: Service, text: str) -> list:
    return [m for m in Store(service.store).pending(limit=1000) if m.text == text]


def test_served_messages_reach_the_store_redacted_with_their_reason(service: Service) -> None:
    sampled = "where is my parcel"  # confident: captured only as a sample (sample_rate 1 here)
    handed = f"forgot my password, card {CARD}, mail jane.doe@example.com"
    with service.client() as client:
        answer = client.post("/v1/route", json={"text": sampled}, headers={"X-Request-ID": "capture-sample"})
        assert answer.status_code == 200 and not answer.json()["decisions"][0]["handoff"]
        [row] = _eventually(lambda: _captured(service, sampled))
        assert (row.reason, row.request_id, row.intent) == ("sample", "capture-sample", "track_order")
        assert row.model_version == answer.json()["model_version"] and row.destination == "track_order-queue"

        write_policy(service.policy, min_confidence=1.0, version="capture-1")  # every message handed off
        try:

            def handed_off() -> dict | None:
                body = client.post("/v1/route", json={"text": handed}).json()
                decision = body["decisions"][0]
                return decision if body["policy_version"] == "capture-1" and decision["handoff"] else None

            decision = _eventually(handed_off, every_s=1)
        finally:
            write_policy(service.policy)
    assert decision, "the edited policy never took effect"
    redacted = "forgot my password, card [CARD], mail [EMAIL]"
    # Before the edit reached the router it may have been captured as a sample too.
    rows = _eventually(lambda: [m for m in _captured(service, redacted) if m.reason != "sample"])
    assert rows and rows[0].reason == decision["reason"] and rows[0].destination == "human-agents"
    assert rows[0].redactions == 2
    assert not [m for m in Store(service.store).pending(limit=1000) if CARD in m.text or "jane" in m.text]


def test_capture_to_an_unreachable_store_reports_itself_degraded(service: Service) -> None:
    with service.client(key=None, prefix="/open") as client:
        assert client.post("/v1/route", json={"text": "where is my parcel"}).status_code == 200
        ready = client.get("/readyz")
    assert ready.status_code == 200  # serving does not depend on the store
    capture = ready.json()["capture"]
    assert capture["state"] == "degraded" and "127.0.0.1:1" in capture["error"]


def test_the_store_stopped_requests_still_answer_and_nothing_is_lost(
    service: Service, postgres: Postgres
) -> None:
    text = "track my parcel please"
    postgres.stop()
    try:
        with service.client() as client:
            for _ in range(5):
                assert client.post("/v1/route", json={"text": text}).status_code == 200

            def degraded() -> dict | None:
                capture = client.get("/readyz").json()["capture"]
                return capture if capture["state"] == "degraded" and capture["pending"] > 0 else None

            capture = _eventually(degraded)
            assert capture and capture["lost"] == 0, client.get("/readyz").json()
    finally:
        postgres.start()
    with service.client() as client:  # back: what waited is written, without a restart
        assert _eventually(lambda: len(_captured(service, text)) >= 5, timeout_s=60, every_s=1)
        capture = client.get("/readyz").json()["capture"]
        assert capture["state"] == "ok" and capture["lost"] == 0
