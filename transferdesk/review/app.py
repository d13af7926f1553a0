"""The review page (`transferdesk review`): captured messages, the least certain first, each
confirmed, corrected, marked out-of-scope or skipped by a reviewer, from the keyboard.

Its own process with its own keys (reviewers' names and keys: $TRANSFERDESK_REVIEW_KEYS or
the file named by $TRANSFERDESK_REVIEW_KEYS_FILE), never part of the serving Ingress.
Server-rendered (Jinja2) with a little plain JavaScript for the keys; no build step.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import yaml
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict, Field

from transferdesk.config import ReviewConfig
from transferdesk.errors import TransferDeskError
from transferdesk.review.store import Action, Store, StoreUnavailable, UnknownMessage, store_url

KEYS_ENV = "TRANSFERDESK_REVIEW_KEYS"  # name:key,name:key
KEYS_FILE_ENV = "TRANSFERDESK_REVIEW_KEYS_FILE"  # YAML: {name: key, ...} (a mounted Secret)
MIN_KEY_CHARS = 16
MAX_NAME_CHARS = 100  # what the store keeps of a reviewer's name
COOKIE = "transferdesk_review"
TEMPLATES = Jinja2Templates(directory=Path(__file__).with_name("templates"))


def review_keys() -> dict[str, str]:
    """{key: reviewer} from the environment and the key file; each key MIN_KEY_CHARS long at
    least, each reviewer named (the name is what the history shows)."""
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


class ReviewRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action: Action
    label: str | None = Field(None, max_length=200, description="The right intent, for `correct`.")
    new_intent: bool = Field(False, description="Accept a label the model does not know as a new intent.")


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def create_app(cfg: ReviewConfig, keys: dict[str, str]) -> FastAPI:
    """The review app over the configured store (migrated on start)."""
    store = Store(store_url(cfg.store))
    store.migrate()
    model_labels: list[str] = []
    if cfg.model:
        from transferdesk.registry import open_version

        model_labels = open_version(cfg.model).labels
    app = FastAPI(title="TransferDesk review", docs_url=None, redoc_url=None, openapi_url=None)

    def owner(given: str) -> str | None:
        """The reviewer a key belongs to, else None; every key compared, in constant time."""
        found = None
        for key, name in keys.items():
            if hmac.compare_digest(given.encode(), key.encode()):
                found = name
        return found

    def reviewer(request: Request) -> str | None:
        """The reviewer whose key the request carries: the sign-in cookie or a bearer header."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return owner(token.strip() if scheme.lower() == "bearer" else request.cookies.get(COOKIE, ""))

    def intents() -> list[str]:
        return sorted(set(model_labels or store.seen_intents()) | set(store.new_intents()))

    def login_page(request: Request, status: int, error: str | None = None) -> HTMLResponse:
        return TEMPLATES.TemplateResponse(request, "login.html", {"error": error}, status_code=status)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request) -> HTMLResponse:
        return login_page(request, 200)

    @app.post("/login")
    async def login(request: Request) -> Response:
        key = parse_qs((await request.body()).decode(errors="replace")).get("key", [""])[0].strip()
        if owner(key) is None:
            return login_page(request, 401, "That review key is not valid.")
        page = RedirectResponse("/", status_code=303)
        # HttpOnly: no script reads it; SameSite=Strict: no other site's form can post with it;
        # Secure behind HTTPS (a TLS-terminating proxy in front: set X-Forwarded-Proto).
        https = request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https"
        page.set_cookie(COOKIE, key, httponly=True, samesite="strict", secure=https)
        return page

    @app.post("/logout")
    def logout() -> Response:
        page = RedirectResponse("/login", status_code=303)
        page.delete_cookie(COOKIE)
        return page

    @app.get("/", response_class=HTMLResponse)
    def page(request: Request) -> HTMLResponse:
        name = reviewer(request)
        if name is None:
            return login_page(request, 401, "Sign in with your review key." if request.cookies else None)
        context = {
            "reviewer": name,
            "queue": store.pending(cfg.queue_size),
            "tally": store.tally(),
            "history": store.history(limit=15),
            "intents": intents(),
            "store": store.where,
        }
        return TEMPLATES.TemplateResponse(request, "review.html", context)

    @app.get("/api/messages")
    def pending(request: Request, limit: int = 50) -> Any:
        if reviewer(request) is None:
            return _error(401, "unauthorized", "missing or invalid review key")
        return [asdict(m) for m in store.pending(min(max(limit, 1), 500))]

    @app.post("/api/messages/{message_id}/review")
    def review(message_id: int, body: ReviewRequest, request: Request) -> Any:
        name = reviewer(request)
        if name is None:
            return _error(401, "unauthorized", "missing or invalid review key")
        label = (body.label or "").strip() or None
        if body.action == "correct" and label is not None and label not in intents() and not body.new_intent:
            return _error(
                409,
                "unknown_intent",
                f"'{label}' is not an intent the model knows; confirm to add it as a new intent "
                "(the next retrain learns it; give it a route in the routing policy)",
            )
        try:
            done = store.review(message_id, name, body.action, label, body.new_intent)
        except UnknownMessage as err:
            return _error(404, "not_found", str(err))
        except StoreUnavailable:
            raise  # 503, below
        except TransferDeskError as err:
            return _error(422, "invalid_review", str(err))
        return asdict(done)

    @app.exception_handler(StoreUnavailable)
    async def _store_down(request: Request, err: StoreUnavailable) -> JSONResponse:
        # Nothing was recorded; the reviewer can press the key again once the store is back.
        return _error(503, "store_unavailable", str(err))

    return app
