"""The HTTP API: versioned FastAPI routes, request and response models, API-key auth,
limits, JSON errors (never a stack trace), and request metrics."""

# No `from __future__ import annotations`: Serve ships the Ingress class by value, and
# FastAPI must see the request models as objects, not as names to look up later.
import asyncio
import hmac
import importlib
import logging
import time
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.config import CALL_TEXTS, KEYS_ENV, KEYS_FILE_ENV, MAX_TOP_K, ServeArgs, api_keys
from deployments.routing import Priority
from transferdesk import __version__
from transferdesk.errors import TransferDeskError
from transferdesk.modeling import Prediction

log = logging.getLogger("ray.serve")
HEALTH_TIMEOUT_S = 5.0
# The replica's Ingress, for the middleware and the auth dependency, which run before any
# Ingress method (Serve serves a copy of `api`, so its app.state is not the place).
LIVE: dict[str, "Ingress"] = {}

api = FastAPI(
    title="TransferDesk intent routing API",
    version=__version__,
    description="Classifies customer messages into intents and routes them to a queue or a "
    "human agent. Every /v1 route needs `Authorization: Bearer <API key>`.",
)
bearer = HTTPBearer(auto_error=False, description="An API key from TRANSFERDESK_API_KEYS.")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextsRequest(Strict):
    text: str | None = Field(None, description="One message.")
    texts: list[str] | None = Field(None, min_length=1, description="Several messages, answered in order.")
    top_k: int | None = Field(
        None, ge=0, le=MAX_TOP_K, description="Alternatives per answer (default: server's)."
    )

    @model_validator(mode="after")
    def _one_of(self) -> "TextsRequest":
        if (self.text is None) == (self.texts is None):
            raise ValueError("send exactly one of `text` or `texts`")
        return self

    def items(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])


class Alternative(BaseModel):
    intent: str
    confidence: float


class Classification(BaseModel):
    intent: str
    confidence: float
    out_of_scope: bool = Field(description="Confidence below the model's calibrated threshold.")
    alternatives: list[Alternative]


class ClassifyResponse(BaseModel):
    request_id: str
    model_version: str = Field(description="Two, comma-separated, only during a model switch.")
    results: list[Classification]


class Decision(BaseModel):
    intent: str
    confidence: float
    destination: str
    priority: Priority
    handoff: bool = Field(description="Goes to the human-agent fallback.")
    reason: Literal["intent", "default", "low_confidence", "out_of_scope", "no_route"]
    alternatives: list[Alternative]


class RouteResponse(BaseModel):
    request_id: str
    model_version: str = Field(description="Two, comma-separated, only during a model switch.")
    policy_version: str
    decisions: list[Decision]


class ModelInfo(BaseModel):
    name: str | None
    version: str
    labels: list[str]
    threshold: float
    metrics: dict[str, float]
    policy_version: str
    switch_error: str | None = Field(description="Why the last requested model switch was refused.")


class Health(BaseModel):
    status: Literal["ok"]


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
    request_id: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (401, "Missing or invalid API key."),
        (411, "No Content-Length header."),
        (413, "Request body or a message too large."),
        (422, "Invalid request; `error.field` names the field."),
    )
}


def _request_id(request: Request) -> str:
    return request.headers.get("x-request-id", "")  # set by Serve when the client did not


def error(request: Request, status: int, code: str, message: str, field: str | None = None) -> JSONResponse:
    body = ErrorResponse(
        error=ErrorDetail(code=code, message=message, field=field), request_id=_request_id(request)
    )
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error(request, exc.status, exc.code, exc.message, exc.field)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's default echoes the offending input: customer text, so never here.
    first = exc.errors()[0]
    field = ".".join(str(part) for part in first["loc"] if part != "body") or None
    if first["type"] == "json_invalid":  # its loc is a character offset, not a field
        field = "body"
    return error(request, 422, "invalid_request", str(first["msg"]), field)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return error(request, exc.status_code, "http_error", str(exc.detail))


@api.exception_handler(Exception)
async def _internal(request: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error")  # the trace goes to the replica log, not to the client
    return error(request, 500, "internal_error", "internal error; quote the request id to support")


class LimitsAndMetrics:
    """Refuses oversized or unsized bodies before they are read, and counts and times every
    request. Plain ASGI: Starlette's BaseHTTPMiddleware costs a task and a stream a request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ingress = LIVE.get("ingress")
        if scope["type"] != "http" or ingress is None:
            return await self.app(scope, receive, send)
        request, start, status = Request(scope), time.perf_counter(), 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:  # an exception still counts (as a 500) before the outermost handler answers it
            refusal = _body_refusal(request, ingress.settings.limits.max_body_bytes)
            await (refusal or self.app)(scope, receive, send_and_note)
        except asyncio.CancelledError:  # the client went away or timed out: no answer was sent
            status = 499
            raise
        finally:
            ingress.observe(request, status, time.perf_counter() - start)


def _body_refusal(request: Request, limit: int) -> JSONResponse | None:
    if request.method != "POST":
        return None
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        return error(request, 411, "length_required", "send a Content-Length header")
    if int(length) > limit:
        return error(request, 413, "body_too_large", f"request body over {limit} bytes", "body")
    return None


api.add_middleware(LimitsAndMetrics)


async def authorize(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    keys = LIVE["ingress"].keys
    if keys is None:
        return
    token = (credentials.credentials if credentials else "").encode()
    matched = False
    for key in keys:  # every key compared, in constant time
        matched |= hmac.compare_digest(token, key)
    if not matched:
        raise ApiError(401, "unauthorized", "missing or invalid API key (Authorization: Bearer <key>)")


def check_keys(settings: ServeArgs) -> list[bytes] | None:
    """The accepted API keys, or None when auth is explicitly disabled."""
    if settings.auth.disabled:
        log.warning("API-key authentication is DISABLED (auth.disabled); for local development only")
        return None
    keys = api_keys()
    if not keys:
        raise TransferDeskError(
            f"no API keys: set {KEYS_ENV} (comma-separated) or {KEYS_FILE_ENV} (a file, one key a "
            "line), or set auth.disabled: true for local development"
        )
    return keys


@serve.deployment  # sizes: deployments/serve.yaml
@serve.ingress(api)
class Ingress:
    def __init__(
        self,
        tokenizer: DeploymentHandle,
        classifier: DeploymentHandle,
        router: DeploymentHandle,
        settings: dict,
    ) -> None:
        from ray.serve.metrics import Counter, Histogram

        self.tokenizer, self.classifier, self.router = tokenizer, classifier, router
        self.settings = ServeArgs.model_validate(settings)
        self.keys = check_keys(self.settings)
        tags = ("route", "status", "model_version")
        self.requests = Counter("transferdesk_requests", description="HTTP requests.", tag_keys=tags)
        self.latency = Histogram(
            "transferdesk_request_latency_ms",
            description="Request latency inside the ingress.",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000],
            tag_keys=tags,
        )
        # Serve ships this class by value, with copied globals: reach the real module's LIVE.
        importlib.import_module(__name__).LIVE["ingress"] = self

    def observe(self, request: Request, status: int, seconds: float) -> None:
        route = getattr(request.scope.get("route"), "path", "unmatched")  # templates, not raw paths
        tags = {"route": route, "status": str(status), "model_version": getattr(request.state, "model", "")}
        self.requests.inc(tags=tags)
        self.latency.observe(seconds * 1000, tags=tags)

    def _checked(self, body: TextsRequest) -> list[str]:
        texts, limits = body.items(), self.settings.limits
        if len(texts) > limits.max_batch_texts:
            raise ApiError(
                422, "too_many_texts", f"at most {limits.max_batch_texts} texts a request", "texts"
            )
        for i, text in enumerate(texts):
            name = "text" if body.text is not None else f"texts.{i}"
            if not text.strip():
                raise ApiError(422, "empty_text", "messages must not be empty", name)
            if len(text) > limits.max_text_chars:
                raise ApiError(413, "text_too_long", f"at most {limits.max_text_chars} characters", name)
        return texts

    async def _predict(self, request: Request, body: TextsRequest) -> list[Prediction]:
        texts = self._checked(body)
        ids = await self.tokenizer.remote(texts)
        # One classifier call per CALL_TEXTS texts: few handle calls, and no call larger than a batch.
        calls = [ids[i : i + CALL_TEXTS] for i in range(0, len(ids), CALL_TEXTS)]
        parts = await asyncio.gather(*(self.classifier.remote(call) for call in calls))
        predictions = [p for _, part in parts for p in part]
        # The texts of one request may be batched on replicas mid-way through a model switch.
        request.state.model = ",".join(sorted({version for version, _ in parts}))
        if self.settings.log_texts:
            log.info("texts: %s", texts)
        return predictions

    def _top_k(self, body: TextsRequest) -> int:
        return self.settings.top_k if body.top_k is None else body.top_k

    @api.post("/v1/classify", responses=ERRORS, dependencies=[Depends(authorize)])
    async def classify(self, body: TextsRequest, request: Request) -> ClassifyResponse:
        """Intent, confidence and alternatives for one message or several."""
        predictions = await self._predict(request, body)
        k = self._top_k(body)
        results = [
            Classification(
                intent=p.intent,
                confidence=p.confidence,
                out_of_scope=p.out_of_scope,
                alternatives=[Alternative(intent=i, confidence=c) for i, c in p.alternatives[:k]],
            )
            for p in predictions
        ]
        log.debug("classify n=%d model=%s", len(results), request.state.model)
        return ClassifyResponse(
            request_id=_request_id(request), model_version=request.state.model, results=results
        )

    @api.post("/v1/route", responses=ERRORS, dependencies=[Depends(authorize)])
    async def route(self, body: TextsRequest, request: Request) -> RouteResponse:
        """Where each message should go: a queue and priority, or a human agent."""
        predictions = await self._predict(request, body)
        decisions = await self.router.remote(predictions, self._top_k(body))
        log.debug(
            "route n=%d model=%s handoffs=%d",
            len(decisions),
            request.state.model,
            sum(d["handoff"] for d in decisions),
        )
        return RouteResponse(
            request_id=_request_id(request),
            model_version=request.state.model,
            policy_version=decisions[0]["policy_version"],
            decisions=[Decision.model_validate(d) for d in decisions],
        )

    @api.get("/v1/model", responses=ERRORS, dependencies=[Depends(authorize)])
    async def model(self) -> ModelInfo:
        """The model being served, its test metrics and the routing policy version."""
        info, policy = await asyncio.gather(self.classifier.info.remote(), self.router.version.remote())
        return ModelInfo(**{k: info[k] for k in ModelInfo.model_fields if k in info}, policy_version=policy)

    @api.get("/healthz")
    async def healthz(self) -> Health:
        """Liveness of the whole chain, without auth (for load balancers and probes)."""
        try:
            await asyncio.wait_for(self.classifier.info.remote(), HEALTH_TIMEOUT_S)
        except Exception as err:
            raise ApiError(503, "unavailable", "the classifier is not answering") from err
        return Health(status="ok")
