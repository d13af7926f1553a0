"""Who may use the review page: reviewers' keys (from the environment or a key file read again
when it changes), signed session cookies, and `Guard`, which checks the reviewer (a bearer key,
or the session cookie signing in sets) and the body's size before the application reads a
body: a stranger is answered 401, a body over `max_body_bytes` 413, without either being read.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import yaml
from fastapi.responses import JSONResponse

from transferdesk.errors import TransferDeskError

log = logging.getLogger(__name__)


def json_error(status: int, code: str, message: str) -> JSONResponse:
    """The review page's error answer: {"error": {"code", "message"}}."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


KEYS_ENV = "TRANSFERDESK_REVIEW_KEYS"  # name:key,name:key
KEYS_FILE_ENV = "TRANSFERDESK_REVIEW_KEYS_FILE"  # YAML: {name: key, ...} (a mounted Secret)
SECRET_ENV = "TRANSFERDESK_REVIEW_SECRET"  # signs the session cookies; unset: one per start
SESSION_HOURS_ENV = "TRANSFERDESK_REVIEW_SESSION_HOURS"  # how long a sign-in lasts
SESSION_HOURS = 8.0
MIN_KEY_CHARS = 16
MIN_SECRET_CHARS = 32
MAX_NAME_CHARS = 100  # what the store keeps of a reviewer's name
COOKIE = "transferdesk_review"
PUBLIC = frozenset({"/healthz", "/login", "/logout"})  # the paths that need no reviewer

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def review_keys() -> dict[str, str]:
    """{key: reviewer} from the environment and the key file; each key MIN_KEY_CHARS long at
    least, each reviewer named (the name is what the history shows). A key file that is named
    but holds no key is refused: emptying it revokes every reviewer, it does not fall back."""
    pairs: list[tuple[str, str]] = []
    for item in filter(None, (x.strip() for x in os.environ.get(KEYS_ENV, "").split(","))):
        name, sep, key = item.partition(":")
        if not sep:
            raise TransferDeskError(f"{KEYS_ENV}: expected name:key pairs, comma-separated")
        pairs.append((name.strip(), key.strip()))
    if path := os.environ.get(KEYS_FILE_ENV):
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise TransferDeskError(f"{KEYS_FILE_ENV}={path}: cannot read it ({err})") from None
        if not isinstance(loaded, dict) or not all(isinstance(k, str) for k in loaded.values()):
            # A key YAML reads as a number (digits alone) would lose its leading zeros: quote it.
            raise TransferDeskError(
                f'{KEYS_FILE_ENV}={path}: expected a mapping of reviewer: "key" (keys quoted, as text)'
            )
        if not loaded:
            raise TransferDeskError(f"{KEYS_FILE_ENV}={path}: the file holds no review key")
        pairs += [(str(name), key) for name, key in loaded.items()]
    if not pairs:
        raise TransferDeskError(
            f"no review keys: set {KEYS_ENV}=name:key[,name:key…] or point {KEYS_FILE_ENV} at a YAML "
            "file of reviewer: key (make keys with `openssl rand -hex 24`)"
        )
    bad = [name for name, key in pairs if not name or len(name) > MAX_NAME_CHARS or len(key) < MIN_KEY_CHARS]
    if bad:
        raise TransferDeskError(
            f"review keys of {', '.join(bad) or 'an unnamed reviewer'}: every key needs a reviewer name "
            f"(at most {MAX_NAME_CHARS} characters) and {MIN_KEY_CHARS} characters at least"
        )
    keys = {key: name for name, key in pairs}
    if len(keys) < len(pairs):
        raise TransferDeskError("two reviewers share a review key: give each their own")
    return keys


class ReviewerKeys:
    """The reviewers' keys, read again when the key file changes (its modification time, size or
    inode, checked on each request: stat follows the links of a Secret mount, whose target
    changes on rotation), so that revoking a reviewer needs no restart. Fails closed: while the
    file is missing, unreadable, empty or invalid, `current()` is None and every request is
    refused (503), with one error line in the log per change."""

    def __init__(self, keys: dict[str, str] | None = None) -> None:
        self.path = os.environ.get(KEYS_FILE_ENV) if keys is None else None
        self.stamp = self._stamp()  # before reading: a change meanwhile is seen next time
        self.keys: dict[str, str] | None = review_keys() if keys is None else dict(keys)

    def _stamp(self) -> tuple[int, int, int, int] | None:
        try:
            info = os.stat(self.path) if self.path else None
        except OSError:
            return None
        return (info.st_mtime_ns, info.st_size, info.st_ino, info.st_dev) if info else None

    def current(self) -> dict[str, str] | None:
        """{key: reviewer} as the file holds them now; None while they cannot be read."""
        if self.path is None:
            return self.keys
        if (stamp := self._stamp()) != self.stamp:
            self.stamp = stamp
            try:
                if stamp is None:
                    raise TransferDeskError(f"{KEYS_FILE_ENV}={self.path}: cannot read it (it is gone)")
                self.keys = review_keys()
                log.info(
                    "review keys reloaded from %s (%d reviewers)", self.path, len(set(self.keys.values()))
                )
            except TransferDeskError as err:
                self.keys = None
                log.error(
                    "review keys unusable, refusing every request (503) until the file is fixed: %s", err
                )
        return self.keys


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Sessions:
    """Sign-in sessions: the cookie holds `payload.signature`, the payload the reviewer's name,
    a fingerprint of their key and an expiry, the signature an HMAC-SHA256 with the server's
    secret. A session holds while it has not expired and the reviewer's key is still configured:
    revoking or changing a key ends its sessions at the next request."""

    def __init__(self, secret: bytes, lifetime_s: float) -> None:
        self.secret, self.lifetime_s = secret, lifetime_s

    @classmethod
    def from_env(cls) -> Sessions:
        """$TRANSFERDESK_REVIEW_SECRET signs; unset, a random secret of this process does (and
        sessions end when it restarts). $TRANSFERDESK_REVIEW_SESSION_HOURS: a session's life."""
        hours_text = os.environ.get(SESSION_HOURS_ENV, "").strip()
        try:
            hours = float(hours_text) if hours_text else SESSION_HOURS
        except ValueError:
            hours = -1.0
        if not 0 < hours <= 24 * 30:
            raise TransferDeskError(
                f"{SESSION_HOURS_ENV}={hours_text}: expected hours, above 0 and at most 720"
            )
        secret = os.environ.get(SECRET_ENV, "").strip()
        if not secret:
            log.warning(
                "%s is not set: sessions are signed with a random secret of this process and end when "
                "the review page restarts (set it, e.g. to `openssl rand -hex 32`, to keep them)",
                SECRET_ENV,
            )
            return cls(secrets.token_bytes(32), hours * 3600)
        if len(secret) < MIN_SECRET_CHARS:
            raise TransferDeskError(
                f"{SECRET_ENV} is shorter than {MIN_SECRET_CHARS} characters; use `openssl rand -hex 32`"
            )
        return cls(secret.encode(), hours * 3600)

    def _mac(self, kind: bytes, data: bytes) -> bytes:
        return hmac.new(self.secret, kind + b"\0" + data, hashlib.sha256).digest()

    def fingerprint(self, key: str) -> str:
        """Names a key in a session without disclosing it."""
        return _b64(self._mac(b"review-key", key.encode())[:16])

    def issue(self, name: str, key: str, now: float | None = None) -> str:
        expires = int((time.time() if now is None else now) + self.lifetime_s)
        payload = json.dumps({"r": name, "k": self.fingerprint(key), "e": expires}, separators=(",", ":"))
        body = _b64(payload.encode())
        return f"{body}.{_b64(self._mac(b'review-session', body.encode()))}"

    def reviewer(self, token: str, keys: dict[str, str], now: float | None = None) -> str | None:
        """The reviewer a session token names, if its signature is ours (compared in constant
        time), it has not expired, and that reviewer's key is still configured; else None."""
        body, _, signature = token.partition(".")
        expected = _b64(self._mac(b"review-session", body.encode(errors="replace")))
        if not hmac.compare_digest(expected.encode(), signature.encode(errors="replace")):
            return None
        try:
            payload = json.loads(_unb64(body))
            name, fingerprint, expires = payload["r"], payload["k"], payload["e"]
        except (ValueError, KeyError, TypeError):
            return None
        if not isinstance(expires, int) or expires <= (time.time() if now is None else now):
            return None
        found = None
        for key, owner in keys.items():
            if (
                hmac.compare_digest(self.fingerprint(key).encode(), str(fingerprint).encode())
                and owner == name
            ):
                found = owner
        return found


def owner(keys: dict[str, str], given: str) -> str | None:
    """The reviewer a key belongs to, else None; every key compared, in constant time."""
    found = None
    for key, name in keys.items():
        if hmac.compare_digest(given.encode(errors="replace"), key.encode()):
            found = name
    return found


def _cookie(headers: dict[bytes, bytes], name: str) -> str:
    for part in headers.get(b"cookie", b"").decode("latin-1").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value.strip().strip('"')
    return ""


class Guard:
    """ASGI middleware, ahead of everything else: refuses a request while the reviewers' keys
    cannot be read (503); outside PUBLIC (and the sign-in page at /) refuses one without a
    reviewer (401); refuses a body over `max_bytes` (413: its Content-Length, or counted as it
    arrives when chunked). Each before the application reads a byte of the body. The reviewer
    found goes to request.state.reviewer."""

    def __init__(self, app: ASGIApp, keys: ReviewerKeys, sessions: Sessions, max_bytes: int) -> None:
        self.app, self.keys, self.sessions, self.max_bytes = app, keys, sessions, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/healthz":
            return await self.app(scope, receive, send)
        keys = self.keys.current()
        if keys is None:
            return await json_error(503, "keys_unavailable", "the review keys cannot be read")(
                scope, receive, send
            )
        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() == "bearer":
            name = owner(keys, token.strip())
        else:
            name = self.sessions.reviewer(_cookie(headers, COOKIE), keys)
        scope.setdefault("state", {})["reviewer"] = name
        page = scope["path"] == "/" and scope["method"] in ("GET", "HEAD")  # shows the sign-in form
        if name is None and scope["path"] not in PUBLIC and not page:
            return await json_error(401, "unauthorized", "missing or invalid review key")(
                scope, receive, send
            )
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await json_error(400, "bad_request", "invalid Content-Length")(scope, receive, send)
            if int(length) > self.max_bytes:
                return await self._too_large(scope, receive, send)
        elif b"transfer-encoding" not in headers:
            return await self.app(scope, receive, send)  # no body
        # Read at most max_bytes (+ one chunk), then hand the application the whole body.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        body: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> Message:
            return body.pop() if body else await receive()

        return await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"the request body is over the review page's limit of {self.max_bytes} bytes"
        await json_error(413, "too_large", message)(scope, receive, send)
