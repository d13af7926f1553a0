"""The review store against both databases: SQLite (a file) and a real PostgreSQL server."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import Postgres
from transferdesk.errors import TransferDeskError
from transferdesk.review.database import STORE_ENV, STORE_FILE_ENV, store_url
from transferdesk.review.store import Capture, Store

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def capture(text: str, ranked: list[tuple[str, float]], reason: str = "sample", minute: int = 0) -> Capture:
    return Capture(
        request_id=f"req-{text[:8]}",
        captured_at=T0 + timedelta(minutes=minute),
        model_version="registry/toy/v1",
        text=text,
        ranked=ranked,
        out_of_scope=reason == "out_of_scope",
        reason=reason,
        destination="human-agents" if reason != "sample" else "orders",
    )


@pytest.fixture
def store(store_url: str) -> Store:
    store = Store(store_url)
    store.migrate()
    return store


def filled(store: Store) -> Store:
    store.add(
        [
            capture("sure thing", [("track_order", 0.95), ("refund_status", 0.03)], minute=0),
            capture("a close call", [("refund_status", 0.40), ("track_order", 0.38)], "low_confidence", 1),
            capture("weather on mars", [("track_order", 0.30), ("reset_password", 0.10)], "out_of_scope", 2),
        ]
    )
    return store


def test_migrating_again_or_from_several_processes_at_once_is_safe(store_url: str) -> None:
    errors: list[Exception] = []

    def migrate() -> None:
        try:
            Store(store_url).migrate()
        except Exception as err:  # collected: a thread's exception would be lost
            errors.append(err)

    threads = [threading.Thread(target=migrate) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    Store(store_url).migrate()  # nothing left to do
    assert Store(store_url).pending() == []


def test_the_queue_puts_the_least_certain_message_first(store: Store) -> None:
    pending = filled(store).pending()
    assert [m.text for m in pending] == ["a close call", "weather on mars", "sure thing"]
    first = pending[0]
    assert first.margin == pytest.approx(0.02)
    assert first.ranked == [("refund_status", 0.40), ("track_order", 0.38)]
    assert first.captured_at == T0 + timedelta(minutes=1)
    assert first.reason == "low_confidence" and not first.out_of_scope


def test_the_hand_offs_to_cluster_are_the_unreviewed_ones_of_those_reasons_newest_first(
    store: Store,
) -> None:
    ids = {m.text: m.id for m in filled(store).pending()}
    reasons = ["out_of_scope", "low_confidence"]
    assert [m.text for m in store.handoffs(reasons, 10)] == ["weather on mars", "a close call"]
    assert [m.text for m in store.handoffs(reasons, 1)] == ["weather on mars"]
    store.review(ids["weather on mars"], "ana", "skip")
    assert [m.text for m in store.handoffs(reasons, 10)] == ["a close call"]
    assert store.unreviewed(list(ids.values())) == {ids["a close call"], ids["sure thing"]}


def test_reviews_leave_the_queue_and_the_last_write_wins_with_both_kept(store: Store) -> None:
    ids = {m.text: m.id for m in filled(store).pending()}
    store.review(ids["a close call"], "ana", "correct", "track_order")
    store.review(ids["a close call"], "ben", "confirm")  # a second reviewer, later
    store.review(ids["weather on mars"], "ana", "out_of_scope")
    store.review(ids["sure thing"], "ben", "skip")
    assert store.pending() == []
    history = store.message(ids["a close call"]).reviews
    assert [(r.reviewer, r.action, r.label) for r in history] == [
        ("ana", "correct", "track_order"),
        ("ben", "confirm", "refund_status"),
    ]
    latest = {m.text: (r.action, r.label) for m, r in store.latest_reviews()}
    assert latest == {
        "a close call": ("confirm", "refund_status"),
        "weather on mars": ("out_of_scope", None),
        "sure thing": ("skip", None),
    }
    tally = store.tally()
    assert (tally.captured, tally.pending, tally.reviewed) == (3, 0, 3)
    assert tally.by_reason == {"sample": 1, "low_confidence": 1, "out_of_scope": 1}
    assert tally.by_label == {"refund_status": 1, "out_of_scope": 1}
    assert tally.by_reviewer == {"ana": 2, "ben": 2}
    assert [text for _, text in store.history(limit=2)] == ["sure thing", "weather on mars"]


def test_unreviewed_and_skipped_messages(store: Store) -> None:
    ids = {m.text: m.id for m in filled(store).pending()}
    store.review(ids["sure thing"], "ana", "skip")
    reviewed, unreviewed = store.for_export()
    assert unreviewed == ["a close call", "weather on mars"]
    assert [(m.text, r.action) for m, r in reviewed] == [("sure thing", "skip")]


@pytest.mark.parametrize(
    ("action", "label", "message"),
    [("guess", None, "unknown review action"), ("correct", " ", "needs the right intent")],
)
def test_a_bad_review_is_refused(store: Store, action: str, label: str | None, message: str) -> None:
    message_id = filled(store).pending()[0].id
    with pytest.raises(TransferDeskError, match=message):
        store.review(message_id, "ana", action, label)  # type: ignore[arg-type]
    with pytest.raises(TransferDeskError, match="no captured message 999"):
        store.review(999, "ana", "confirm")


def test_an_unreachable_or_invalid_store_says_which(postgres: Postgres) -> None:
    closed = postgres.url().replace(f":{postgres.port}/", ":1/")
    with pytest.raises(TransferDeskError, match=r"store postgresql\+psycopg://transferdesk@127.0.0.1:1/"):
        Store(closed, connect_timeout_s=1).migrate()
    with pytest.raises(TransferDeskError, match="not a database URL"):
        Store("capture.db")
    with pytest.raises(TransferDeskError, match="only SQLite and PostgreSQL"):
        Store("mysql://user@host/db")
    secret = "postgresql+psycopg://user:hunter2@127.0.0.1:1/db"
    with pytest.raises(TransferDeskError) as err:
        Store(secret, connect_timeout_s=1).migrate()
    assert "hunter2" not in str(err.value)


def test_the_store_url_comes_from_the_environment_or_a_mounted_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(STORE_ENV, raising=False)
    monkeypatch.setenv(STORE_FILE_ENV, str(tmp_path / "url"))
    assert store_url("sqlite:///capture.db") == "sqlite:///capture.db"  # an optional Secret, absent
    (tmp_path / "url").write_text("postgresql+psycopg://td:secret@db/td\n")
    assert store_url("sqlite:///capture.db") == "postgresql+psycopg://td:secret@db/td"
    monkeypatch.setenv(STORE_ENV, "sqlite:////var/capture.db")
    assert store_url("sqlite:///capture.db") == "sqlite:////var/capture.db"
