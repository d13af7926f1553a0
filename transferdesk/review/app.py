"""The review page (`transferdesk review`): captured messages, the least certain first, each
confirmed, corrected, marked out-of-scope or skipped by a reviewer, from the keyboard; and, with
the served model, the unreviewed hand-offs clustered (clusters.py), to name a group at once.

Its own process with its own keys (reviewers' names and keys: $TRANSFERDESK_REVIEW_KEYS or
the file named by $TRANSFERDESK_REVIEW_KEYS_FILE, read again when it changes), never part of the
serving Ingress. Server-rendered (Jinja2) with a little plain JavaScript for the keys; no build
step.

Before the application reads a body, `Guard` (access.py) checks the reviewer (a bearer key, or
the signed session cookie that signing in sets) and the body's size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict, Field

from transferdesk.errors import TransferDeskError
from transferdesk.model.explain import explain
from transferdesk.review.access import COOKIE, Guard, ReviewerKeys, Sessions, json_error, owner
from transferdesk.review.clusters import NO_MODEL, ClusterCache, UnknownCluster, UnknownIntent, name_cluster
from transferdesk.review.config import ReviewConfig
from transferdesk.review.database import StoreUnavailable, UnknownMessage, store_url
from transferdesk.review.store import Action, Store

if TYPE_CHECKING:
    from transferdesk.model.modeling import IntentModel

log = logging.getLogger(__name__)

TEMPLATES = Jinja2Templates(directory=Path(__file__).with_name("templates"))


class ModelUnavailable(TransferDeskError):
    """The served model (--model) cannot be loaded now: its files changed or went missing."""


class ReviewRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action: Action
    label: str | None = Field(None, max_length=200, description="The right intent, for `correct`.")
    new_intent: bool = Field(False, description="Accept a label the model does not know as a new intent.")


class NameRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str = Field(
        ..., min_length=1, max_length=200, description="An intent, a new one, or the out-of-scope label."
    )
    exclude: list[int] = Field(
        default_factory=list, description="The cluster's messages that are not examples of it."
    )
    new_intent: bool = Field(False, description="Accept a label the model does not know as a new intent.")


def create_app(
    cfg: ReviewConfig, keys: ReviewerKeys | dict[str, str] | None = None, sessions: Sessions | None = None
) -> FastAPI:
    """The review app over the configured store (migrated on start). keys: the reviewers' (by
    default from the environment and the key file, reloaded as it changes); sessions: what
    signs the sign-in cookies (by default Sessions.from_env())."""
    keyring = keys if isinstance(keys, ReviewerKeys) else ReviewerKeys(keys)
    sessions = sessions or Sessions.from_env()
    store = Store(store_url(cfg.store))
    store.migrate()
    model_labels: list[str] = []
    clusters: ClusterCache | None = None
    served_model: Callable[[], IntentModel] | None = None
    if cfg.model:
        from transferdesk.registry import open_version

        version = open_version(cfg.model)
        model_labels = version.labels

        @cache  # successes only: a load that failed is tried again by the next request
        def served_model() -> IntentModel:
            # Loaded on the first clustering, not at start: a page nobody clusters on needs no
            # encoder in memory. Torch: embeddings come from the torch network.
            from transferdesk.model.modeling import IntentModel

            try:
                return IntentModel.from_pretrained(version, runtime="torch")
            except (TransferDeskError, OSError) as err:
                raise ModelUnavailable(f"the served model {version.path} cannot be loaded: {err}") from err

        clusters = ClusterCache(store, cfg.clusters, served_model)
    app = FastAPI(title="TransferDesk review", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, keys=keyring, sessions=sessions, max_bytes=cfg.max_body_bytes)

    def reviewer(request: Request) -> str | None:
        """The reviewer Guard found: by a bearer key, or the signed session in the cookie."""
        return getattr(request.state, "reviewer", None)

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
        # Guard has read no more than max_body_bytes of it.
        key = parse_qs((await request.body()).decode(errors="replace")).get("key", [""])[0].strip()
        name = owner(keyring.current() or {}, key)
        if name is None:
            return login_page(request, 401, "That review key is not valid.")
        page = RedirectResponse("/", status_code=303)
        # A signed, expiring session, not the key. HttpOnly: no script reads it; SameSite=Strict:
        # no other site's form can post with it; Secure behind HTTPS (a TLS-terminating proxy in
        # front: set X-Forwarded-Proto).
        https = request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https"
        page.set_cookie(
            COOKIE,
            sessions.issue(name, key),
            max_age=int(sessions.lifetime_s),
            httponly=True,
            samesite="strict",
            secure=https,
        )
        return page

    @app.post("/logout")
    def logout() -> Response:
        page = RedirectResponse("/login", status_code=303)
        page.delete_cookie(COOKIE, httponly=True, samesite="strict")
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
            "clustering": clusters is not None,
            "no_model": NO_MODEL,
            "oos_label": cfg.oos_label,
        }
        return TEMPLATES.TemplateResponse(request, "review.html", context)

    @app.get("/api/messages")
    def pending(request: Request, limit: int = 50) -> Any:
        if reviewer(request) is None:
            return json_error(401, "unauthorized", "missing or invalid review key")
        return [asdict(m) for m in store.pending(min(max(limit, 1), 500))]

    @app.post("/api/messages/{message_id}/review")
    def review(message_id: int, body: ReviewRequest, request: Request) -> Any:
        name = reviewer(request)
        if name is None:
            return json_error(401, "unauthorized", "missing or invalid review key")
        label = (body.label or "").strip() or None
        if body.action == "correct" and label is not None and label not in intents() and not body.new_intent:
            return json_error(
                409,
                "unknown_intent",
                f"'{label}' is not an intent the model knows; confirm to add it as a new intent "
                "(the next retrain learns it; give it a route in the routing policy)",
            )
        try:
            done = store.review(message_id, name, body.action, label, body.new_intent)
        except UnknownMessage as err:
            return json_error(404, "not_found", str(err))
        except StoreUnavailable:
            raise  # 503, below
        except TransferDeskError as err:
            return json_error(422, "invalid_review", str(err))
        return asdict(done)

    @app.get("/api/messages/{message_id}/explain")
    def explain_message(message_id: int, request: Request) -> Any:
        """The words that raised and lowered the served model's confidence in the intent the
        message was given (its top intent, where the model no longer has that one)."""
        if reviewer(request) is None:
            return json_error(401, "unauthorized", "missing or invalid review key")
        if served_model is None:
            return json_error(409, "no_model", NO_MODEL)
        try:
            message = store.message(message_id)
        except UnknownMessage as err:
            return json_error(404, "not_found", str(err))
        model = served_model()
        why = explain(model, [message.text], [message.intent if message.intent in model.labels else None])[0]
        return asdict(why)

    # Plain `def` routes: FastAPI runs them in its thread pool, so a clustering (every hand-off
    # embedded) never holds up the event loop and the page stays responsive.
    @app.get("/api/clusters")
    def list_clusters(request: Request, refresh: bool = False) -> Any:
        if reviewer(request) is None:
            return json_error(401, "unauthorized", "missing or invalid review key")
        if clusters is None:
            return json_error(409, "no_model", NO_MODEL)
        found = clusters.current(refresh)
        return asdict(found) | {
            "growth_hours": cfg.clusters.growth_hours,
            "representatives": cfg.clusters.representatives,
        }

    @app.post("/api/clusters/{cluster_id}/name")
    def name(cluster_id: str, body: NameRequest, request: Request) -> Any:
        who = reviewer(request)
        if who is None:
            return json_error(401, "unauthorized", "missing or invalid review key")
        if clusters is None:
            return json_error(409, "no_model", NO_MODEL)
        try:
            cluster = clusters.find(cluster_id)
            named = name_cluster(
                store, cluster, body.label, who, intents(), body.exclude, body.new_intent, cfg.oos_label
            )
        except UnknownCluster as err:
            return json_error(404, "unknown_cluster", str(err))
        except UnknownIntent as err:
            return json_error(409, "unknown_intent", str(err))
        except StoreUnavailable:
            raise  # 503, below
        except TransferDeskError as err:
            return json_error(422, "invalid_name", str(err))
        return asdict(named)

    @app.exception_handler(ModelUnavailable)
    async def _model_down(request: Request, err: ModelUnavailable) -> JSONResponse:
        # The operator's to mend (the version's files, or --model); the page needs no restart.
        return json_error(503, "model_unavailable", str(err))

    @app.exception_handler(StoreUnavailable)
    async def _store_down(request: Request, err: StoreUnavailable) -> JSONResponse:
        # Nothing was recorded; the reviewer can press the key again once the store is back.
        return json_error(503, "store_unavailable", str(err))

    return app
