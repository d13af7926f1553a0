"""Who gets into the review page, and what it reads before it knows: `transferdesk review`
started as its own process with its keys in a file, over real HTTP (raw sockets where a client
library would send the whole body first)."""

from __future__ import annotations

import base64
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.review.test_app import start_review_page
from transferdesk.review.access import COOKIE

KEYS = {"ana": "ana-review-key-0123456789", "ben": "ben-review-key-0123456789"}
SECRET = "review-session-secret-0123456789abcdef"
LIMIT = 4096  # --max_body_bytes


@dataclass
class Page:
    url: str
    keys_file: Path
    log: Path


def _write_keys(path: Path, keys: dict[str, str]) -> None:
    """As a rotated Kubernetes Secret arrives: a new file swapped in whole."""
    partial = path.with_name(path.name + ".new")
    partial.write_text("".join(f'{name}: "{key}"\n' for name, key in keys.items()))
    os.replace(partial, path)


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Page]:
    """The page with its reviewers' keys in a file, a session secret, and a 4 KiB body limit."""
    keys_file = tmp_path / "review-keys.yaml"
    _write_keys(keys_file, KEYS)
    env = {
        "TRANSFERDESK_REVIEW_KEYS": "",
        "TRANSFERDESK_REVIEW_KEYS_FILE": str(keys_file),
        "TRANSFERDESK_REVIEW_SECRET": SECRET,
    }
    log = tmp_path / "review.log"
    store = f"sqlite:///{tmp_path / 'capture.db'}"
    proc, url = start_review_page(store, log, env, "--max_body_bytes", str(LIMIT))
    try:
        yield Page(url, keys_file, log)
    finally:
        proc.terminate()
        proc.wait(10)


def _status(url: str, head: list[str], body: bytes = b"", timeout: float = 10) -> int:
    """The status the page answers a request sent as bytes: answered before the body is all
    there (an app that waits for it first times out here)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as conn:
        conn.sendall("".join(f"{line}\r\n" for line in [*head, "Host: review", ""]).encode() + body)
        reply = conn.recv(4096)
    return int(reply.split(b" ", 2)[1])


def _signed_in(page: Page, name: str) -> httpx.Client:
    client = httpx.Client(base_url=page.url, timeout=10)
    assert client.post("/login", data={"key": KEYS[name]}).status_code == 303
    return client


def test_a_stranger_is_refused_before_the_body_is_read(page: Page) -> None:
    # A gigabyte announced, none sent: refused at once, not waited for.
    big = ["POST /api/messages/1/review HTTP/1.1", "Content-Type: application/json"]
    assert _status(page.url, [*big, "Content-Length: 1000000000"]) == 401
    assert _status(page.url, [*big, "Transfer-Encoding: chunked"]) == 401
    forged = f"Cookie: {COOKIE}={KEYS['ana']}"  # the key itself is no session
    assert _status(page.url, [*big, forged, "Content-Length: 1000000000"]) == 401


def test_a_body_over_the_limit_is_refused_unread(page: Page) -> None:
    bearer = f"Authorization: Bearer {KEYS['ana']}"
    review = ["POST /api/messages/1/review HTTP/1.1", "Content-Type: application/json", bearer]
    assert _status(page.url, [*review, "Content-Length: 1000000000"]) == 413
    assert _status(page.url, [*review, f"Content-Length: {LIMIT + 1}"]) == 413
    # Sign-in needs no key, so its body is the stranger's: limited too, and counted when chunked
    # (no length said; the last chunk never comes).
    login = ["POST /login HTTP/1.1", "Content-Type: application/x-www-form-urlencoded"]
    chunk = b"400\r\n" + b"k" * 1024 + b"\r\n"
    assert _status(page.url, [*login, "Transfer-Encoding: chunked"], chunk * (LIMIT // 1024 + 1)) == 413
    assert _status(page.url, [*login, f"Content-Length: {LIMIT * 1000}"]) == 413
    # Under the limit, chunked or not, it goes through.
    form = f"key={KEYS['ana']}".encode()
    chunked = f"{len(form):x}\r\n".encode() + form + b"\r\n0\r\n\r\n"
    assert _status(page.url, [*login, "Transfer-Encoding: chunked"], chunked) == 303
    assert _status(page.url, [*login, f"Content-Length: {len(form)}"], form) == 303
    assert httpx.post(f"{page.url}/login", data={"key": "k" * LIMIT}).status_code == 413


def _payload(token: str) -> dict:
    body = token.split(".")[0]
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


def test_the_cookie_is_a_signed_expiring_session_not_the_key(page: Page) -> None:
    answer = httpx.post(
        f"{page.url}/login", data={"key": KEYS["ana"]}, headers={"X-Forwarded-Proto": "https"}
    )
    assert answer.status_code == 303
    cookie = answer.headers["set-cookie"]
    token = answer.cookies[COOKIE]
    assert KEYS["ana"] not in cookie and token != KEYS["ana"]
    flags = {part.strip().split("=")[0].lower(): part.strip() for part in cookie.split(";")}
    assert {"httponly", "secure", "max-age"} <= flags.keys()
    assert flags["samesite"].lower() == "samesite=strict"
    assert flags["max-age"] == "Max-Age=28800"  # 8 hours, the default
    payload = _payload(token)
    assert payload["r"] == "ana" and abs(payload["e"] - (time.time() + 8 * 3600)) < 120

    def shown(token: str) -> int:
        return httpx.get(page.url, cookies={COOKIE: token}, timeout=10).status_code

    assert shown(token) == 200
    from transferdesk.review.access import Sessions

    ours = Sessions(SECRET.encode(), 3600)
    assert shown(ours.issue("ana", KEYS["ana"])) == 200  # signed with the configured secret
    assert shown(ours.issue("ana", KEYS["ana"], now=time.time() - 3601)) == 401  # expired
    assert shown(Sessions(b"another-secret-0123456789abcdefgh", 3600).issue("ana", KEYS["ana"])) == 401
    assert shown(ours.issue("ben", KEYS["ana"])) == 401  # ana's key does not make ben
    signature = token.split(".")[1]
    as_ben = base64.urlsafe_b64encode(json.dumps({**payload, "r": "ben"}).encode()).decode().rstrip("=")
    assert shown(f"{as_ben}.{signature}") == 401  # altered
    longer = base64.urlsafe_b64encode(json.dumps({**payload, "e": payload["e"] + 10**6}).encode())
    assert shown(f"{longer.decode().rstrip('=')}.{signature}") == 401
    assert shown(KEYS["ana"]) == 401 and shown("") == 401 and shown("x.y") == 401
    posted = httpx.post(
        f"{page.url}/api/messages/1/review",
        json={"action": "skip"},
        cookies={COOKIE: ours.issue("ana", KEYS["ana"], now=time.time() - 3601)},
    )
    assert posted.status_code == 401
    gone = httpx.post(f"{page.url}/logout", cookies={COOKIE: token})
    assert gone.status_code == 303 and not gone.cookies.get(COOKIE)
    assert "max-age=0" in gone.headers["set-cookie"].lower()


def test_a_revoked_reviewer_is_signed_out_without_a_restart(page: Page) -> None:
    ana, ben = _signed_in(page, "ana"), _signed_in(page, "ben")
    bearer = {"Authorization": f"Bearer {KEYS['ben']}"}
    assert ana.get("/").status_code == ben.get("/").status_code == 200
    assert httpx.get(f"{page.url}/api/messages", headers=bearer).status_code == 200
    _write_keys(page.keys_file, {"ana": KEYS["ana"]})
    assert ben.get("/").status_code == 401 and ben.get("/api/messages").status_code == 401
    assert httpx.get(f"{page.url}/api/messages", headers=bearer).status_code == 401
    assert ana.get("/").status_code == 200
    # A reviewer added, or a key changed, takes effect as well: the old key's sessions end.
    cy = "cy-review-key-0123456789"
    _write_keys(page.keys_file, {"ana": "ana-new-review-key-0123456789", "cy": cy})
    assert ana.get("/").status_code == 401
    assert httpx.post(f"{page.url}/login", data={"key": cy}).status_code == 303
    assert "reloaded" in page.log.read_text()


def test_an_empty_or_unreadable_key_file_refuses_every_request(page: Page) -> None:
    ana = _signed_in(page, "ana")
    bearer = {"Authorization": f"Bearer {KEYS['ana']}"}
    for broken in ("", "not: [a, mapping, of, keys", None):  # emptied, garbled, gone
        if broken is None:
            page.keys_file.unlink()
        else:
            page.keys_file.write_text(broken)
        assert ana.get("/").status_code == 503
        assert ana.get("/api/messages", headers=bearer).status_code == 503
        refused = httpx.post(f"{page.url}/login", data={"key": KEYS["ana"]})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "keys_unavailable"
        assert httpx.get(f"{page.url}/healthz").status_code == 200  # alive, refusing
    assert page.log.read_text().count("refusing every request") == 3
    _write_keys(page.keys_file, KEYS)  # fixed: back without a restart, sessions intact
    assert ana.get("/").status_code == 200
