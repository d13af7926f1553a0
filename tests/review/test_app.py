"""The review page, as a reviewer uses it: `transferdesk review` started as its own process,
over real HTTP, driven in a real headless Chromium (Debian's, by Playwright), and its export."""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.deployments.conftest import free_port
from tests.review.conftest import GIFT_CARDS, add_handoffs
from transferdesk.registry import ModelVersion
from transferdesk.review.store import Capture, Store

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, Playwright

CHROMIUM = Path("/usr/bin/chromium")
KEYS = {"ana": "ana-review-key-0123456789", "ben": "ben-review-key-0123456789"}
# Where the README's screenshot comes from: TRANSFERDESK_SCREENSHOTS=docs make test.
SCREENSHOTS = os.environ.get("TRANSFERDESK_SCREENSHOTS")
# (text, ranked intents): the queue shows them least certain (smallest margin) first.
MESSAGES = [
    (
        "my card payment was declined twice at the checkout",
        [("payment_failed", 0.41), ("card_declined", 0.39)],
    ),
    (
        "I was charged for [NUMBER] but never got the item",
        [("refund_status", 0.45), ("payment_failed", 0.40)],
    ),
    ("where is my parcel, it was due on monday", [("track_order", 0.52), ("delivery_delay", 0.43)]),
    (
        "can I change the delivery address of order ORD-20240501",
        [("track_order", 0.50), ("change_address", 0.35)],
    ),
    ("what's the weather like in Lisbon", [("track_order", 0.31), ("refund_status", 0.12)]),
    ("please reset my password", [("reset_password", 0.97), ("account_locked", 0.01)]),
]


ENV = {
    "TRANSFERDESK_REVIEW_KEYS": ",".join(f"{n}:{k}" for n, k in KEYS.items()),
    "TRANSFERDESK_REVIEW_KEYS_FILE": "",
    "TRANSFERDESK_REVIEW_SECRET": "",  # a random one: sessions end at restart
}


@dataclass
class ReviewPage:
    url: str
    store: Store
    store_url: str
    log: Path


def start_review_page(
    store_url: str, log: Path, env: dict[str, str], *args: str
) -> tuple[subprocess.Popen, str]:
    """`transferdesk review` over the store, with `env` added to the environment, on a free
    port: the process and its URL, once it answers /healthz."""
    port = free_port()
    command = [sys.executable, "-m", "transferdesk", "review", "--store", store_url, "--port", str(port)]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*command, *args], env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"transferdesk review did not start:\n{log.read_text()}")
        time.sleep(0.3)


@pytest.fixture
def review_page(store_url: str, tmp_path: Path) -> Iterator[ReviewPage]:
    """The page over a store of each kind (SQLite, PostgreSQL) holding MESSAGES."""
    store = Store(store_url)
    store.migrate()
    t0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    store.add(
        [
            Capture(
                f"req-{i}",
                t0 + timedelta(minutes=i),
                "registry/northwind/v3",
                text,
                ranked,
                i == 4,
                "out_of_scope" if i == 4 else ("low_confidence" if i < 4 else "sample"),
                "human-agents",
            )
            for i, (text, ranked) in enumerate(MESSAGES)
        ]
    )
    log = tmp_path / "review.log"
    proc, url = start_review_page(store_url, log, ENV)
    try:
        yield ReviewPage(url, store, store_url, log)
    finally:
        proc.terminate()
        proc.wait(10)


def _login(page: ReviewPage, key: str) -> httpx.Client:
    client = httpx.Client(base_url=page.url, timeout=10)
    client.post("/login", data={"key": key})
    return client


def test_without_or_with_a_wrong_key_nothing_is_shown_or_recorded(review_page: ReviewPage) -> None:
    anonymous = httpx.Client(base_url=review_page.url, timeout=10)
    first = review_page.store.pending()[0]
    assert anonymous.get("/").status_code == 401
    assert "Sign in" in anonymous.get("/").text and first.text not in anonymous.get("/").text
    assert anonymous.get("/api/messages").status_code == 401
    wrong = {"Authorization": "Bearer not-a-review-key-000000"}
    assert (
        anonymous.post(
            f"/api/messages/{first.id}/review", json={"action": "confirm"}, headers=wrong
        ).status_code
        == 401
    )
    refused = anonymous.post("/login", data={"key": "not-a-review-key-000000"})
    assert refused.status_code == 401 and "not valid" in refused.text
    assert review_page.store.latest_reviews() == []
    signed_in = _login(review_page, KEYS["ana"])
    assert signed_in.get("/").status_code == 200 and first.text in signed_in.get("/").text
    # No TRANSFERDESK_REVIEW_SECRET: a random one, and the log says what that means.
    assert "end when the review page restarts" in review_page.log.read_text()


def test_two_reviewers_on_one_message_are_both_kept_and_the_last_wins(review_page: ReviewPage) -> None:
    first = review_page.store.pending()[0]
    for name, body in (("ana", {"action": "confirm"}), ("ben", {"action": "out_of_scope"})):
        answer = httpx.post(
            f"{review_page.url}/api/messages/{first.id}/review",
            json=body,
            headers={"Authorization": f"Bearer {KEYS[name]}"},
        )
        assert answer.status_code == 200, answer.text
    history = review_page.store.message(first.id).reviews
    assert [(r.reviewer, r.action) for r in history] == [("ana", "confirm"), ("ben", "out_of_scope")]
    assert [r.action for _, r in review_page.store.latest_reviews()] == ["out_of_scope"]


def test_a_label_the_model_does_not_know_needs_confirming(review_page: ReviewPage) -> None:
    first = review_page.store.pending()[0]
    post = lambda body: httpx.post(  # noqa: E731
        f"{review_page.url}/api/messages/{first.id}/review",
        json=body,
        headers={"Authorization": f"Bearer {KEYS['ana']}"},
    )
    refused = post({"action": "correct", "label": "gift_cards"})
    assert (
        refused.status_code == 409 and "not an intent the model knows" in refused.json()["error"]["message"]
    )
    assert review_page.store.latest_reviews() == []
    assert post({"action": "correct", "label": "gift_cards", "new_intent": True}).status_code == 200
    assert "gift_cards" in review_page.store.new_intents()
    assert post({"action": "correct", "label": "gift_cards"}).status_code == 200  # known now
    assert post({"action": "dance"}).status_code == 422
    missing = httpx.post(
        f"{review_page.url}/api/messages/999/review",
        json={"action": "skip"},
        headers={"Authorization": f"Bearer {KEYS['ana']}"},
    )
    assert missing.status_code == 404


def _chromium(playwright: Playwright) -> Browser:
    if not CHROMIUM.exists():
        pytest.fail("no Chromium: apt-get install chromium (make test installs it)")
    return playwright.chromium.launch(
        executable_path=str(CHROMIUM),
        args=[
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
        ],
    )


def _signed_in(browser: Browser, url: str, reviewer: str) -> Page:
    """A page of the review page, signed in through its form."""
    page = browser.new_page(viewport={"width": 1280, "height": 820})
    assert page.goto(url).status == 401
    page.fill("#key", KEYS[reviewer])
    with page.expect_navigation():
        page.click("button[type=submit]")
    assert page.inner_text("#reviewer") == reviewer
    return page


def _export(page: ReviewPage, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "transferdesk",
            "review",
            "export",
            "--store",
            page.store_url,
            "--out",
            str(tmp_path / "reviewed.csv"),
            "--pool",
            str(tmp_path / "pool.csv"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_an_export_with_nothing_reviewed_says_so(review_page: ReviewPage, tmp_path: Path) -> None:
    done = _export(review_page, tmp_path)
    assert done.returncode != 0 and "nothing reviewed yet" in done.stderr
    assert not (tmp_path / "reviewed.csv").exists()


def test_a_reviewer_labels_by_keyboard_in_a_real_browser_and_exports(
    review_page: ReviewPage, tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    shots = Path(SCREENSHOTS) if SCREENSHOTS else tmp_path
    queue = [m.text for m in review_page.store.pending()]
    with sync_playwright() as p:
        browser = _chromium(p)
        page = _signed_in(browser, review_page.url, "ana")

        def press(*keys: str) -> None:
            with page.expect_navigation():  # the page reloads with the next message on top
                for key in keys:
                    page.keyboard.press(key)

        press("1")  # confirms the model: payment_failed
        press("1")  # refund_status
        press("2")  # the second suggestion: delivery_delay
        page.screenshot(path=str(shots / "review-page.png"))
        page.keyboard.press("c")  # correct the next, searching the intent list
        page.keyboard.type("change_address")
        press("Enter")
        press("o")  # the weather question: out of scope
        assert "ana" in page.inner_text("#history")
        browser.close()
    done = _export(review_page, tmp_path)
    assert done.returncode == 0, done.stderr
    with open(tmp_path / "reviewed.csv", newline="", encoding="utf-8") as f:
        exported = {row["text"]: row["label"] for row in csv.DictReader(f)}
    assert exported == {
        queue[0]: "payment_failed",
        queue[1]: "refund_status",
        queue[2]: "delivery_delay",
        queue[3]: "change_address",
        queue[4]: "oos",
    }
    with open(tmp_path / "pool.csv", newline="", encoding="utf-8") as f:
        assert [row["text"] for row in csv.DictReader(f)] == [queue[5]]
    assert {r.reviewer for _, r in review_page.store.latest_reviews()} == {"ana"}


@pytest.mark.parametrize(
    ("env", "file", "message"),
    [
        ("", None, "no review keys"),
        ("ana-without-a-name-0123", None, "expected name:key pairs"),
        ("ana:short", None, "16 characters at least"),
        ("ana:same-key-0123456789,ben:same-key-0123456789", None, "share a review key"),
        ("", "ana: 1234567890123456789\n", "keys quoted, as text"),  # YAML reads it as a number
        # An emptied key file revokes its reviewers; it never leaves the others to carry on.
        ("ana:ana-review-key-0123456789", "", "holds no review key"),
    ],
)
def test_bad_review_keys_are_refused_with_what_to_do(
    env: str, file: str | None, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transferdesk.errors import TransferDeskError
    from transferdesk.review.access import review_keys

    monkeypatch.setenv("TRANSFERDESK_REVIEW_KEYS", env)
    if file is not None:
        (tmp_path / "keys.yaml").write_text(file)
        monkeypatch.setenv("TRANSFERDESK_REVIEW_KEYS_FILE", str(tmp_path / "keys.yaml"))
    with pytest.raises(TransferDeskError, match=message):
        review_keys()
    (tmp_path / "good.yaml").write_text('ben: "0123456789012345678"\n')
    monkeypatch.setenv("TRANSFERDESK_REVIEW_KEYS_FILE", str(tmp_path / "good.yaml"))
    monkeypatch.setenv("TRANSFERDESK_REVIEW_KEYS", "ana:ana-review-key-0123456789")
    assert review_keys() == {"ana-review-key-0123456789": "ana", "0123456789012345678": "ben"}


def test_without_the_served_model_the_page_says_clustering_needs_it(review_page: ReviewPage) -> None:
    ana = _login(review_page, KEYS["ana"])
    assert "clustering the hand-offs needs the served model" in ana.get("/").text
    answer = ana.get("/api/clusters")
    assert answer.status_code == 409 and answer.json()["error"]["code"] == "no_model"
    message = review_page.store.pending(1)[0].id
    assert ana.get(f"/api/messages/{message}/explain").json()["error"]["code"] == "no_model"
    assert httpx.get(f"{review_page.url}/api/clusters").status_code == 401


@contextlib.contextmanager
def page_with_model(model: Path, tmp_path: Path) -> Iterator[ReviewPage]:
    """The page with `model` served, over a SQLite store of hand-offs holding two clusters."""
    url = f"sqlite:///{tmp_path / 'capture.db'}"
    store = Store(url)
    store.migrate()
    add_handoffs(store)
    log = tmp_path / "review.log"
    settings = ["--model", str(model), "--clusters.min_cluster_size", "4"]
    proc, page_url = start_review_page(url, log, ENV, *settings)
    try:
        yield ReviewPage(page_url, store, url, log)
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def cluster_page(served_version: ModelVersion, tmp_path: Path) -> Iterator[ReviewPage]:
    with page_with_model(served_version.path, tmp_path) as page:
        yield page


def test_a_served_model_that_cannot_be_loaded_is_a_clear_503_until_it_is_mended(
    served_version: ModelVersion, tmp_path: Path
) -> None:
    # A copy of the registry: the session's version stays intact for the other tests.
    registry = shutil.copytree(served_version.path.parents[1], tmp_path / "registry")
    version = registry / served_version.path.parent.name / served_version.path.name
    head = version / "head.safetensors"
    intact = head.read_bytes()
    ana = {"Authorization": f"Bearer {KEYS['ana']}"}
    with page_with_model(version, tmp_path) as page:
        # Replaced after the page started, before the model's first use (it is loaded lazily).
        head.write_bytes(intact[:-4] + b"\x00\x00\x00\x00")
        message = page.store.pending(1)[0].id
        for path in (f"/api/messages/{message}/explain", "/api/clusters"):
            answer = httpx.get(f"{page.url}{path}", headers=ana, timeout=60)
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"]["code"] == "model_unavailable"
            assert str(version) in answer.json()["error"]["message"]
        head.write_bytes(intact)  # mended: the next request loads it, without a restart
        why = httpx.get(f"{page.url}/api/messages/{message}/explain", headers=ana, timeout=60)
        assert why.status_code == 200 and why.json()["text"] == page.store.pending(1)[0].text
        assert len(httpx.get(f"{page.url}/api/clusters", headers=ana, timeout=60).json()["clusters"]) == 2


def test_a_reviewer_names_a_cluster_in_a_real_browser(cluster_page: ReviewPage) -> None:
    from playwright.sync_api import sync_playwright

    ids = {m.text: m.id for m in cluster_page.store.pending(100)}
    ana = {"Authorization": f"Bearer {KEYS['ana']}"}
    # The first clustering loads the model and embeds every hand-off: seconds on a busy machine.
    gone = httpx.post(
        f"{cluster_page.url}/api/clusters/00000000/name", json={"label": "x"}, headers=ana, timeout=120
    )
    assert gone.status_code == 404 and "list them again" in gone.json()["error"]["message"]
    first = cluster_page.store.pending(1)[0]
    why = httpx.get(f"{cluster_page.url}/api/messages/{first.id}/explain", headers=ana, timeout=60).json()
    assert [w["text"] for w in why["words"]] == first.text.split() and why["intent"] == first.intent
    missing = httpx.get(f"{cluster_page.url}/api/messages/999999/explain", headers=ana)
    assert missing.status_code == 404
    with sync_playwright() as p:
        browser = _chromium(p)
        page = _signed_in(browser, cluster_page.url, "ana")
        # The selected message's words, highlighted by how much each moved the confidence.
        marks = page.locator(".item.selected .text mark")
        marks.first.wait_for()
        assert marks.all_inner_texts() == first.text.split()
        assert page.locator(".item.selected .text").inner_text() == first.text
        card = page.locator(".cluster", has_text=GIFT_CARDS[0])
        card.locator("summary").first.click()  # shows its messages and the naming form
        assert card.locator("summary").first.inner_text().startswith("8 messages")
        assert "gift" in card.locator(".words").inner_text()
        assert page.locator(".cluster").count() == 2
        card.locator(f"input[value='{ids[GIFT_CARDS[0]]}']").uncheck()
        card.locator("input[list=intents]").fill("gift_cards")
        if SCREENSHOTS:
            page.screenshot(path=str(Path(SCREENSHOTS) / "review-clusters.png"))
        page.once("dialog", lambda dialog: dialog.accept())  # yes: a new intent
        with page.expect_navigation():
            card.locator(".name-cluster").click()
        # Clustered again, without the named ones (the crypto messages, alone with the noise, are
        # no cluster: HDBSCAN finds a group only beside another).
        page.wait_for_function("!/^Clustering/.test(document.getElementById('cluster-list').textContent)")
        assert "No clusters: 13 of 13 unreviewed" in page.inner_text("#cluster-list")  # 1 unticked
        assert "gift_cards" in page.inner_text("#history")
        browser.close()
    labels = {m.text: (r.reviewer, r.label, r.new_intent) for m, r in cluster_page.store.latest_reviews()}
    assert labels == {text: ("ana", "gift_cards", True) for text in GIFT_CARDS[1:]}
