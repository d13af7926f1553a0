"""The HTTP API: versioned FastAPI routes, request and response models, API-key auth,
limits, JSON errors (never a stack trace), and request metrics."""

# No `from __future__ import annotations`: Serve ships the Ingress class by value, and
# FastAPI must see the request models as objects, not as names to look up later.
import asyncio
import hmac
import importlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    SerializerFunctionWrapHandler,
    StringConstraints,
    model_serializer,
    model_validator,
)
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.capture import CaptureWriter
from deployments.config import CALL_TEXTS, MAX_TOP_K, Coalescing, KeyRing, Limits, ServeArgs
from deployments.drift import DriftMonitor
from deployments.gate import BatchGate
from deployments.routing import Priority
from deployments.topology import InProcess, attach, in_process
from transferdesk import __version__
from transferdesk.model.explain import variants, weigh
from transferdesk.model.multi_intent import chosen_cuts, cut_parts, requests
from transferdesk.model.prediction import Prediction

log = logging.getLogger("ray.serve")
T = TypeVar("T")
HEALTH_TIMEOUT_S = 5.0
READY_CACHE_S = 2.0  # /readyz answers from its last check for this long (probes come often)
RETRY_AFTER_S = 1  # what a 503 asks the client to wait before trying again
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
# The replica's Ingress, for the middleware and the auth dependency, which run before any
# Ingress method (Serve serves a copy of `api`, so its app.state is not the place).
LIVE: dict[str, "Ingress"] = {}


class Api(FastAPI):
    """FastAPI whose published schema states the limits this replica enforces (configured in
    serve.yaml's `limits`), so that clients generated from it send what the service accepts."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None and (ingress := _live()) is not None:
            schema = super().openapi()
            limits = ingress.settings.limits
            texts = schema["components"]["schemas"]["TextsRequest"]["properties"]
            texts["text"]["maxLength"] = limits.max_text_chars
            texts["texts"]["maxItems"] = limits.max_batch_texts
            texts["texts"]["items"]["maxLength"] = limits.max_text_chars
        return super().openapi()


def _live() -> "Ingress | None":
    return LIVE.get("ingress")


api = Api(
    title="TransferDesk intent routing API",
    version=__version__,
    description="Classifies customer messages into intents and routes them to a queue or a "
    "human agent. Every /v1 route needs `Authorization: Bearer <API key>`.",
)
bearer = HTTPBearer(auto_error=False, description="An API key from TRANSFERDESK_API_KEYS.")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# A message holds a visible character and no control character but tab, newline and carriage
# return: NUL and its kin are no text a customer types, and a database may refuse to store them
# (PostgreSQL refuses NUL). One rule, stated in the schema as this pattern (ECMA and Python read
# it alike) and checked by `_readable` with a message that names the offending character.
# pydantic refuses text that is not valid Unicode (a lone surrogate, legal in JSON) as it
# validates the string.
CONTROL = r"\x00-\x08\x0b\x0c\x0e-\x1f\x7f"
TEXT_PATTERN = rf"^[^{CONTROL}]*[^\s{CONTROL}][^{CONTROL}]*$"


_CONTROL_CHAR = re.compile(f"[{CONTROL}]")


def _readable(text: str) -> str:
    """TEXT_PATTERN, checked on every message of every request: no control character, then
    not only white space (str.isspace is the pattern's \\s)."""
    if found := _CONTROL_CHAR.search(text):
        raise ValueError(
            f"control character U+{ord(found.group()):04X} at position {found.start()}: text may hold "
            "tab, newline and carriage return, no other control character"
        )
    if text.isspace():
        raise ValueError("must hold a visible character, not only white space")
    return text


@dataclass(frozen=True)
class _Pattern:
    """Puts the rule `_readable` checks into the JSON schema, where clients and schema-driven
    tests read it."""

    pattern: str

    def __get_pydantic_json_schema__(self, core: Any, handler: GetJsonSchemaHandler) -> dict[str, Any]:
        return {**handler(core), "pattern": self.pattern}


CustomerText = Annotated[
    str, StringConstraints(min_length=1), AfterValidator(_readable), _Pattern(TEXT_PATTERN)
]


def _whole_number(value: Any) -> Any:
    """JSON Schema's integer: 3 and 3.0, not true or "3" (which lax parsing would take)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("must be a whole number")
    return value


WholeNumber = Annotated[int, BeforeValidator(_whole_number)]


def _exactly_one(schema: dict[str, Any]) -> None:
    """The schema states the rule the validator enforces: `text` or `texts`, never both or
    neither; and absent fields have no default (null is not a valid value of either)."""
    for prop in schema["properties"].values():
        prop.pop("default", None)
    schema["oneOf"] = [{"required": ["text"]}, {"required": ["texts"]}]


class TextsRequest(Strict):
    # Strict: `"top_k": false` or `"top_k": "3"` is refused, as the schema says, not coerced.
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_exactly_one)

    text: CustomerText = Field(None, description="One message.")
    texts: list[CustomerText] = Field(None, min_length=1, description="Several messages, answered in order.")
    top_k: WholeNumber = Field(
        None, ge=0, le=MAX_TOP_K, description="Alternatives per answer (default: server's)."
    )

    @model_validator(mode="after")
    def _one_of(self) -> "TextsRequest":
        if (self.text is None) == (self.texts is None):
            raise ValueError("send exactly one of `text` or `texts`")
        return self

    def items(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])


class ExplainRequest(Strict):
    model_config = ConfigDict(extra="forbid", strict=True)

    text: CustomerText = Field(description="The message.")
    intent: str | None = Field(
        None, min_length=1, description="The intent to explain; default: the message's top intent."
    )


class ExplainedWord(BaseModel):
    text: str
    start: int = Field(description="Character offset of the word in the message.")
    end: int
    weight: float = Field(
        description="How much the intent's confidence falls when the word is left out; negative: the "
        "word held it down."
    )


class ExplainResponse(BaseModel):
    request_id: str
    model_version: str
    intent: str
    confidence: float = Field(description="The intent's confidence with every word in.")
    words: list[ExplainedWord] = Field(description="Every word of the message, in order.")


class Alternative(BaseModel):
    intent: str
    confidence: float


class TaskAnswer(BaseModel):
    label: str
    confidence: float


TASKS_FIELD = Field(
    default_factory=dict,
    description="Each other head's answer by task (urgency, sentiment …), from the same encoder pass; "
    "empty for a model of the intent alone. GET /v1/model lists the heads and their labels.",
)


class OnlyWithTwoRequests(BaseModel):
    """An answer whose `requests` appear only for a message with two (args.multi_intent): one
    with a single request has exactly the shape it has without the search."""

    @model_serializer(mode="wrap")
    def _without_requests(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if data.get("requests") is None:
            data.pop("requests", None)
        return data


class Classification(OnlyWithTwoRequests):
    intent: str
    confidence: float
    out_of_scope: bool = Field(
        description="The model's out-of-scope score below its threshold, both chosen on validation "
        "data (GET /v1/model: calibration)."
    )
    alternatives: list[Alternative]
    tasks: dict[str, TaskAnswer] = TASKS_FIELD
    requests: list[Alternative] | None = Field(
        None,
        description="Only for a message with two requests (args.multi_intent): each one's intent and "
        "confidence, in the message's order; `intent` stays the whole message's top intent.",
    )


class ClassifyResponse(BaseModel):
    request_id: str
    model_version: str = Field(description="Two, comma-separated, only during a model switch.")
    results: list[Classification]


class RequestDecision(BaseModel):
    """One of a message's two requests, routed on its own."""

    intent: str
    confidence: float
    destination: str
    priority: Priority
    handoff: bool
    reason: Literal["intent", "default", "low_confidence", "queue_threshold", "no_route", "rule"]


class Decision(OnlyWithTwoRequests):
    intent: str
    confidence: float
    destination: str
    priority: Priority
    handoff: bool = Field(description="Goes to people: the human-agent fallback, or a rule's queue.")
    reason: Literal[
        "intent", "default", "low_confidence", "queue_threshold", "out_of_scope", "no_route", "rule"
    ]
    rule: str | None = Field(None, description="The policy rule that chose the queue (reason `rule`).")
    alternatives: list[Alternative]
    tasks: dict[str, TaskAnswer] = TASKS_FIELD
    requests: list[RequestDecision] | None = Field(
        None,
        description="Only for a message with two requests (args.multi_intent): each one's decision, in "
        "the message's order; this decision is the primary one's (the routing policy's `primary`), so "
        "that contact-center software can open a ticket per request.",
    )


class RouteResponse(BaseModel):
    request_id: str
    model_version: str = Field(description="Two, comma-separated, only during a model switch.")
    policy_version: str
    decisions: list[Decision]


class RolloutInfo(BaseModel):
    mode: Literal["canary", "shadow"]
    runtime: str | None = Field(description="What the second version runs on: torch, onnx or onnx-int8.")
    share: float = Field(description="Canary: the share of calls it answers.")
    version: str | None = Field(description="The second version; null while it is refused.")
    error: str | None = Field(description="Why it was refused.")
    compared: int | None = Field(None, description="Shadow: texts both versions scored.")
    disagreement_rate: float | None = Field(None, description="Shadow: share with another top intent.")
    mean_confidence_shift: float | None = Field(None, description="Shadow: mean |top-confidence change|.")


class Calibration(BaseModel):
    """How the model's confidences are calibrated and its threshold was chosen (the run's
    calibration settings and the temperature fitted on validation data)."""

    temperature: bool
    fitted_temperature: float
    score: str = Field(description="softmax (the calibrated top confidence), energy or centroid.")
    target: str = Field(description="balance, handoff_rate, precision or oos_recall.")
    value: float | None


class PolicyThresholds(BaseModel):
    """The routing policy's confidence thresholds: below them a message routed by intent goes to
    the fallback (reasons `low_confidence`, `queue_threshold`)."""

    min_confidence: float
    queues: dict[str, float] = Field(description="Per destination.")
    routes: dict[str, float] = Field(description="Per intent, where its route sets one.")


class ModelInfo(BaseModel):
    name: str | None
    version: str
    labels: list[str]
    tasks: dict[str, list[str]] = Field(description="Other heads beside the intent's: task → labels.")
    threshold: float = Field(
        description="The model's out-of-scope threshold, on its score (calibration.score)."
    )
    calibration: Calibration
    runtime: str = Field(description="What the forward pass runs on: torch, onnx or onnx-int8.")
    metrics: dict[str, float]
    policy_version: str
    policy_thresholds: PolicyThresholds
    switch_error: str | None = Field(description="Why the last requested model switch was refused.")
    rollout: RolloutInfo | None = Field(
        description="A canary or shadow version beside this one (one replica's view)."
    )


class Health(BaseModel):
    status: Literal["ok"]


class CaptureStatus(BaseModel):
    state: Literal["starting", "ok", "degraded"] = Field(
        description="degraded: the store does not take writes; requests are answered all the same."
    )
    store: str = Field(description="The store's URL, without its password.")
    written: int
    lost: int = Field(description="Messages lost to a full queue or a failed write.")
    pending: int = Field(description="Messages waiting in memory for the store.")
    error: str | None


class DriftStatus(BaseModel):
    """One version's drift figures over its last messages on this replica (args.drift)."""

    messages: int = Field(description="In the window, up to args.drift.window.")
    routed: int = Field(description="Of them, routed (/v1/route): what the hand-off rates are shares of.")
    out_of_scope_rate: float
    mean_confidence: float
    handoff_rates: dict[str, float] = Field(description="By the decision's reason.")
    divergence: float | None = Field(
        description="Jensen-Shannon divergence (bits) of the decisions' mix from validation's; null until "
        "the window is full, or for a version that recorded no validation mix."
    )


class Readiness(BaseModel):
    status: Literal["ready"]
    checks: dict[str, str] | None = Field(
        None, description="Each stage of the chain and what it answered (with an API key)."
    )
    capture: CaptureStatus | None = Field(
        None, description="This replica's capture for review (args.capture), when enabled (with an API key)."
    )
    drift: dict[str, DriftStatus] | None = Field(
        None, description="This replica's drift figures by model version (with an API key)."
    )


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
        (400, "The body is not text (not UTF-8)."),
        (401, "Missing or invalid API key."),
        (408, "The request body did not arrive in time."),
        (413, "Request body too large."),
        (422, "Invalid request; `error.field` names the field."),
        (503, "Overloaded or not ready: retry after the `Retry-After` header's seconds."),
    )
}


EXPLAIN_ERRORS = {
    **ERRORS,
    404: {"model": ErrorResponse, "description": "`intent` is not an intent of the served model."},
}


def _json(answer: BaseModel) -> Response:
    """An answer built (so validated) once, and serialized once: returned as a plain Response,
    FastAPI does not validate it against its response_model a second time."""
    return Response(answer.model_dump_json(), media_type="application/json")


def _request_id(request: Request) -> str:
    return request.headers.get("x-request-id", "")  # set by Serve when the client did not


def error(
    request: Request,
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(
        error=ErrorDetail(code=code, message=message, field=field), request_id=_request_id(request)
    )
    headers = dict(headers or {})
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if status == 503:
        headers["Retry-After"] = str(RETRY_AFTER_S)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


class ApiError(HTTPException):
    """An answer with a status, a code and a message. An HTTPException, so that FastAPI passes
    it on unchanged when it is raised while the body is being read."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(status, message)
        self.code, self.message, self.field = code, message, field


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error(request, exc.status_code, exc.code, exc.message, exc.field)


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
    # Keeps Starlette's headers: `Allow` on a 405 says which methods the path takes.
    return error(request, exc.status_code, "http_error", str(exc.detail), headers=exc.headers)


@api.exception_handler(BackPressureError)
async def _overloaded(request: Request, exc: BackPressureError) -> JSONResponse:
    # A deployment's queue is full (max_queued_requests): say so at once, not after a time-out.
    return error(request, 503, "overloaded", "the service is at capacity; retry shortly")


@api.exception_handler(Exception)
async def _internal(request: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error")  # the trace goes to the replica log, not to the client
    return error(request, 500, "internal_error", "internal error; quote the request id to support")


@dataclass(frozen=True)
class Job:
    """One request's share of an Ingress batch: its texts, top_k when it is to be routed, and
    when its time is up (it started on arrival, before the batch)."""

    texts: list[str]
    top_k: int | None
    deadline: float


@dataclass
class Answer:
    predictions: list[Prediction]
    answered_by: list[str]  # each text's model version (mid-switch or under a canary: two)
    decisions: list[dict] | None = None
    error: Exception | None = None  # a classifier call that failed this request's texts
    requests: list[list[tuple[str, float]] | None] | None = None  # each text's two, where looked for

    @property
    def versions(self) -> str:
        """The model version(s) that answered, comma-separated."""
        return ",".join(sorted(set(self.answered_by)))


def job_texts(jobs: list[Job]) -> int:
    """An Ingress batch's size in texts (@serve.batch's batch_size_fn)."""
    return sum(len(job.texts) for job in jobs)


# Batch size a replica starts with; ServeArgs.coalescing sets it for the replica at start.
COALESCING = Coalescing()
# Ingress batches under way at once; requests that arrive meanwhile wait at the gate and form
# the next. Two: one is tokenized or routed while another is classified.
CONCURRENT_BATCHES = 2


class LimitsAndMetrics:
    """Bounds every request body as it arrives (bytes counted, not the declared length
    trusted; a slow body cut off), guards the docs, and counts and times every request.
    Plain ASGI: Starlette's BaseHTTPMiddleware costs a task and a stream a request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if (ingress := _live()) is None:  # no limits or keys to check requests against yet
            starting = error(Request(scope), 503, "starting", "the service is starting; retry shortly")
            return await starting(scope, receive, send)
        request, start, status = Request(scope), time.perf_counter(), 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:  # an exception still counts (as a 500) before the outermost handler answers it
            refusal = _docs_refusal(request, ingress) or _declared_refusal(request, ingress.settings.limits)
            bounded = _bounded_body(receive, ingress.settings.limits)
            await (refusal or self.app)(scope, bounded, send_and_note)
        except asyncio.CancelledError:  # the client went away or timed out: no answer was sent
            status = 499
            raise
        finally:
            ingress.observe(request, status, time.perf_counter() - start)


def _declared_refusal(request: Request, limits: Limits) -> JSONResponse | None:
    """A declared length over the limit is refused before a byte of the body is read."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limits.max_body_bytes:
        return error(
            request, 413, "body_too_large", f"request body over {limits.max_body_bytes} bytes", "body"
        )
    return None


def _bounded_body(receive: Receive, limits: Limits) -> Receive:
    """`receive` that counts the body's bytes as they come (chunked bodies have no declared
    length) and gives up on a body that has not fully arrived within the time limit."""
    received, complete = 0, False
    deadline = time.monotonic() + limits.body_timeout_s

    async def bounded() -> Message:
        nonlocal received, complete
        if complete:  # after the body only a disconnect can come: no limit on waiting for it
            return await receive()
        try:
            # asyncio.timeout, not wait_for: no task of its own for every receive (per request).
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                message = await receive()
        except TimeoutError:
            raise ApiError(
                408, "body_timeout", f"request body not received within {limits.body_timeout_s:g} s", "body"
            ) from None
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            complete = not message.get("more_body", False)
            if received > limits.max_body_bytes:
                raise ApiError(
                    413, "body_too_large", f"request body over {limits.max_body_bytes} bytes", "body"
                )
        return message

    return bounded


def _docs_refusal(request: Request, ingress: "Ingress") -> JSONResponse | None:
    path, root = request.scope["path"], request.scope.get("root_path", "")
    if root and path.startswith(root):  # under a route prefix such as /open
        path = path[len(root) :]
    if path not in DOCS_PATHS:
        return None
    exposure = ingress.settings.docs.exposure
    if exposure == "off":
        return error(request, 404, "not_found", "not found")
    if exposure == "keyed" and not ingress.accepts(request.headers.get("authorization", "")):
        return error(
            request, 401, "unauthorized", "the API docs need an API key (Authorization: Bearer <key>)"
        )
    return None


api.add_middleware(LimitsAndMetrics)


async def authorize(request: Request) -> None:
    ingress = _live()
    if not ingress.accepts(request.headers.get("authorization", "")):
        if ingress.keyring is not None and ingress.keyring.error:  # fails closed, and says it is ours
            raise ApiError(503, "keys_unavailable", "the service cannot read its API keys; retry shortly")
        raise ApiError(401, "unauthorized", "missing or invalid API key (Authorization: Bearer <key>)")


# The key is read from the header by `authorize` itself (a missing or malformed header is a
# 401 there, as a wrong key is); this only documents the scheme in the OpenAPI schema.
_BEARER = [
    Depends(HTTPBearer(auto_error=False, description="An API key from TRANSFERDESK_API_KEYS.")),
    Depends(authorize),
]


@serve.deployment  # sizes: deployments/serve.yaml
@serve.ingress(api)
class Ingress:
    """The HTTP API in front of the tokenizer, classifier and router: deployments of their own
    (handles, the split topology) or objects built in this replica (fused), called alike
    (deployments/topology.py)."""

    def __init__(
        self,
        tokenizer: DeploymentHandle | InProcess,
        classifier: DeploymentHandle | InProcess,
        router: DeploymentHandle | InProcess,
        settings: dict,
    ) -> None:
        from ray.serve.metrics import Counter, Histogram

        self.settings = ServeArgs.model_validate(settings)
        self.tokenizer, self.classifier, self.router = map(attach, (tokenizer, classifier, router))
        if self.settings.auth.disabled:
            log.warning("API-key authentication is DISABLED (auth.disabled); for local development only")
        self.keyring = None if self.settings.auth.disabled else KeyRing()
        capture = self.settings.capture
        self.capture = CaptureWriter(capture, capture.url()) if capture.enabled else None
        self.drift = DriftMonitor(self.settings.drift, lambda: self.classifier.references.remote())
        self._answer_batch.set_max_batch_size(self.settings.coalescing.max_texts)
        self.gate = BatchGate(CONCURRENT_BATCHES)
        self.explaining = 0  # explanations under way (args.explain.max_concurrent)
        self.ready: tuple[float, Readiness | ApiError | None] = (0.0, None)
        tags = ("route", "status", "model_version")
        self.requests = Counter("transferdesk_requests", description="HTTP requests.", tag_keys=tags)
        self.latency = Histogram(
            "transferdesk_request_latency_ms",
            description="Request latency inside the ingress.",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000],
            tag_keys=tags,
        )
        self.batch_requests = Histogram(
            "transferdesk_ingress_batch_requests",
            description="Requests per Ingress batch: concurrent requests gathered into one call of "
            "each deployment.",
            boundaries=[1, 2, 4, 8, 16, 32, 64],
        )
        # Serve ships this class by value, with copied globals: reach the real module's LIVE.
        importlib.import_module(__name__).LIVE["ingress"] = self

    def __del__(self) -> None:
        # Serve calls this on a graceful shutdown (a scale-down, a redeploy): write what is queued.
        if getattr(self, "capture", None) is not None:
            self.capture.close()

    async def reconfigure(self, config: dict) -> None:
        """The classifier's user_config (ClassifierConfig: batching, a model switch, a rollout),
        which the fused topology gives the Ingress, its one deployment: applied in place."""
        classifier = in_process(self.classifier)
        if classifier is None:  # split: the Classifier deployment has its own user_config
            log.error("user_config on the Ingress is ignored in the split topology: set the Classifier's")
            return
        await classifier.reconfigure(config)

    def check_health(self) -> None:
        """Fused: fails (and Serve replaces the replica) when the classifier held here cannot
        answer a forward pass. Split: the Classifier deployment checks its own."""
        if (classifier := in_process(self.classifier)) is not None:
            classifier.check_health()

    def accepts(self, authorization: str) -> bool:
        """Whether an Authorization header carries a current key (every key compared, in
        constant time); always, when auth is disabled."""
        if self.keyring is None:
            return True
        scheme, _, token = authorization.partition(" ")
        matched = False
        for key in self.keyring.current():
            matched |= hmac.compare_digest(token.strip().encode(), key)
        return matched and scheme.lower() == "bearer"

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
            if len(text) > limits.max_text_chars:
                # 422, not 413: the schema states this limit (maxLength), so this is invalid input.
                raise ApiError(422, "text_too_long", f"at most {limits.max_text_chars} characters", name)
        return texts

    async def _answer(self, request: Request, body: TextsRequest, route: bool) -> Answer:
        """This request's predictions (and decisions, to route), from the batch it joins; within
        the request's time limit, waiting for its batch included."""
        texts = self._checked(body)
        deadline = time.monotonic() + self.settings.limits.request_timeout_s
        job = Job(texts, self._top_k(body) if route else None, deadline)
        try:  # waiting at the gate included
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                answer = await self._gated(job)
        except TimeoutError:
            raise ApiError(503, "timeout", "the service did not answer in time; retry shortly") from None
        if answer.error is not None:
            raise answer.error
        request.state.model = answer.versions
        if self.capture is not None:
            self.capture.offer(
                _request_id(request), answer.answered_by, texts, answer.predictions, answer.decisions
            )
        self.drift.observe(answer.answered_by, answer.predictions, answer.decisions)
        if self.settings.log_texts:
            log.info("texts: %s", texts)
        return answer

    async def _gated(self, job: Job) -> Answer:
        await self.gate.wait()
        return await self._answer_batch(job)

    @serve.batch(
        max_batch_size=COALESCING.max_texts,
        batch_wait_timeout_s=0.0,
        max_concurrent_batches=CONCURRENT_BATCHES,
        batch_size_fn=job_texts,
    )
    async def _answer_batch(self, jobs: list[Job]) -> list[Answer]:
        """The requests that arrived while earlier batches were under way, together: one
        tokenizer call, one classifier call per CALL_TEXTS texts, one router call. Each hop
        (split) costs about a millisecond of CPU on each side, whatever it carries; one call for many
        requests is what lets the service keep up under load. A lone request goes at once."""
        self.batch_requests.observe(len(jobs))
        with self.gate.batch():
            return await self._answer_jobs(jobs)

    async def _answer_jobs(self, jobs: list[Job]) -> list[Answer]:
        # Work for the longest-waiting request's time at most: past it, nobody is waiting.
        deadline = max(job.deadline for job in jobs)
        texts = [text for job in jobs for text in job.texts]
        ids = await self._within_time(lambda: self.tokenizer.remote(texts), deadline)
        # No call larger than a classifier batch; split, the calls spread over the replicas, and a
        # call that fails (back-pressure, a time-out) fails the requests whose texts it held, not
        # the batch. Fused, the classifier in this replica takes them all at once.
        calls = [ids[i : i + CALL_TEXTS] for i in range(0, len(ids), CALL_TEXTS)]
        parts = await self._classify(calls, deadline)
        scored: list[tuple[str, Prediction] | Exception] = []
        for call, part in zip(calls, parts, strict=True):
            if isinstance(part, BaseException):
                if not isinstance(part, Exception):  # cancellation and the like: not ours to keep
                    raise part
                scored += [part] * len(call)
            else:
                scored += [(part[0], prediction) for prediction in part[1]]
        answers, start = [], 0
        for job in jobs:
            mine, start = scored[start : start + len(job.texts)], start + len(job.texts)
            if failed := next((x for x in mine if isinstance(x, Exception)), None):
                answers.append(Answer([], [], error=failed))
                continue
            # A request's texts may be scored by two versions mid-way through a switch.
            by = [version for version, _ in mine]
            answers.append(Answer([prediction for _, prediction in mine], by))
        if self.settings.multi_intent.enabled:
            found = await self._requests(texts, deadline)
            for job, answer in zip(jobs, answers, strict=True):
                answer.requests, found = found[: len(job.texts)], found[len(job.texts) :]
        routed = [
            (answer, job.top_k)
            for answer, job in zip(answers, jobs, strict=True)
            if job.top_k is not None and answer.error is None
        ]
        if routed:
            groups = [(answer.predictions, top_k, answer.requests) for answer, top_k in routed]
            decided = await self._within_time(lambda: self.router.remote(groups), deadline)
            for (answer, _), decisions in zip(routed, decided, strict=True):
                answer.decisions = decisions
        return answers

    async def _classify(self, calls: list[list[list[int]]], deadline: float) -> list[Any]:
        """Each call's answer or the exception it failed with: fused, one call of the classifier
        in this replica with them all (this batch is its batch); split, each call on whichever
        Classifier replica its handle picks, where it joins the batch under way."""
        if (classifier := in_process(self.classifier)) is not None:
            try:
                return await self._within_time(lambda: classifier.answer(calls), deadline)
            except Exception as err:
                return [err] * len(calls)
        return await asyncio.gather(
            *(self._within_time(lambda c=c: self.classifier.remote(c), deadline) for c in calls),
            return_exceptions=True,
        )

    async def _requests(self, texts: list[str], deadline: float) -> list[list[tuple[str, float]] | None]:
        """Each text's two requests, or None (args.multi_intent): every part of every cut of
        the batch's texts tokenized and scored in one call each, by the served version."""
        starts, parts = cut_parts(texts)
        if not parts:
            return [None] * len(texts)
        ids = await self._within_time(lambda: self.tokenizer.remote(parts), deadline)
        threshold, tops = await self._within_time(lambda: self.classifier.tops.remote(ids), deadline)
        return [requests(cut, threshold) for cut in chosen_cuts(starts, tops)]

    async def _within_time(self, call: Callable[[], Awaitable[T]], deadline: float | None = None) -> T:
        """A downstream call, made again once on another replica when the one it reached died
        under it (classifying is idempotent), and answered 503 when it takes longer than
        limits.request_timeout_s, or past `deadline` (a stuck or saturated deployment), rather
        than left to the client's own time-out."""
        deadline = deadline or time.monotonic() + self.settings.limits.request_timeout_s
        for attempt in (1, 2):
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):  # no task, unlike wait_for
                    return await call()
            except TimeoutError:
                raise ApiError(503, "timeout", "the service did not answer in time; retry shortly") from None
            except (RayActorError, ReplicaUnavailableError) as err:
                if attempt == 2:
                    raise ApiError(503, "unavailable", "a replica was lost; retry shortly") from err
                log.warning("a replica was lost mid-request (%s); calling another", type(err).__name__)
        raise AssertionError("unreachable")

    def _top_k(self, body: TextsRequest) -> int:
        return self.settings.top_k if body.top_k is None else body.top_k

    @api.post("/v1/classify", response_model=ClassifyResponse, responses=ERRORS, dependencies=_BEARER)
    async def classify(self, body: TextsRequest, request: Request) -> Response:
        """Intent, confidence and alternatives for one message or several."""
        answer = await self._answer(request, body, route=False)
        k = self._top_k(body)
        results = [
            Classification(
                intent=p.intent,
                confidence=p.confidence,
                out_of_scope=p.out_of_scope,
                alternatives=[Alternative(intent=i, confidence=c) for i, c in p.alternatives[:k]],
                tasks={task: TaskAnswer(label=label, confidence=c) for task, (label, c) in p.tasks.items()},
                requests=[Alternative(intent=i, confidence=c) for i, c in found] if found else None,
            )
            for p, found in zip(
                answer.predictions, answer.requests or [None] * len(answer.predictions), strict=True
            )
        ]
        log.debug("classify n=%d model=%s", len(results), request.state.model)
        return _json(
            ClassifyResponse(
                request_id=_request_id(request), model_version=request.state.model, results=results
            )
        )

    @api.post("/v1/route", response_model=RouteResponse, responses=ERRORS, dependencies=_BEARER)
    async def route(self, body: TextsRequest, request: Request) -> Response:
        """Where each message should go: a queue and priority, or a human agent."""
        decisions = (await self._answer(request, body, route=True)).decisions
        log.debug(
            "route n=%d model=%s handoffs=%d",
            len(decisions),
            request.state.model,
            sum(d["handoff"] for d in decisions),
        )
        return _json(
            RouteResponse(
                request_id=_request_id(request),
                model_version=request.state.model,
                policy_version=decisions[0]["policy_version"],
                decisions=decisions,
            )
        )

    @api.post("/v1/explain", response_model=ExplainResponse, responses=EXPLAIN_ERRORS, dependencies=_BEARER)
    async def explain(self, body: ExplainRequest, request: Request) -> Response:
        """The words that raised and lowered the confidence of one message's top intent (or of
        `intent`): each left out in turn, one forward pass per word (limits: args.explain)."""
        limits = self.settings.explain
        if len(body.text) > self.settings.limits.max_text_chars:
            raise ApiError(
                422, "text_too_long", f"at most {self.settings.limits.max_text_chars} characters", "text"
            )
        texts = variants(body.text)
        if len(texts) - 1 > limits.max_words:
            raise ApiError(422, "too_many_words", f"at most {limits.max_words} words to explain", "text")
        if self.explaining >= limits.max_concurrent:
            raise ApiError(503, "busy", "explanations are under way at their limit; retry shortly")
        self.explaining += 1
        try:
            ids = await self._within_time(lambda: self.tokenizer.remote(texts))
            found = await self._within_time(lambda: self.classifier.explain.remote(ids, body.intent))
        finally:
            self.explaining -= 1
        if found is None:
            # 404, not 422: the request is well formed; the intent it names is not there.
            raise ApiError(
                404, "unknown_intent", f"{body.intent!r} is not an intent of the served model", "intent"
            )
        version, intent, confidences = found
        request.state.model = version
        why = weigh(body.text, intent, confidences)
        return _json(
            ExplainResponse(
                request_id=_request_id(request),
                model_version=version,
                intent=why.intent,
                confidence=why.confidence,
                words=[ExplainedWord(**asdict(word)) for word in why.words],
            )
        )

    @api.get("/v1/model", responses=ERRORS, dependencies=_BEARER)
    async def model(self) -> ModelInfo:
        """The model being served, its test metrics and the routing policy version."""
        info, policy = await asyncio.gather(
            self._within_time(lambda: self.classifier.info.remote()),
            self._within_time(lambda: self.router.thresholds.remote()),
        )
        return ModelInfo(
            **{k: info[k] for k in ModelInfo.model_fields if k in info},
            policy_version=policy.pop("version"),
            policy_thresholds=policy,
        )

    @api.get("/healthz")
    async def healthz(self) -> Health:
        """Liveness of this Ingress replica alone, without auth and without calling anything:
        cheap enough for a probe every second."""
        return Health(status="ok")

    @api.get("/readyz", responses={503: ERRORS[503]})
    async def readyz(self, request: Request) -> Readiness:
        """Readiness of the whole chain (tokenizer, classifier, router), without auth; answered
        from the last check for READY_CACHE_S, so frequent probes cost one check. Only the
        status without an API key; with one, what each stage answered and, with capture on,
        its state (never cached; a degraded capture does not make the service unready)."""
        checked, answer = self.ready
        if answer is None or time.monotonic() - checked > READY_CACHE_S:
            try:
                answer = await self._check_chain()
            except ApiError as err:  # a failure is cached too: probes during an outage stay cheap
                answer = err
            self.ready = (time.monotonic(), answer)
        keyed = self.accepts(request.headers.get("authorization", ""))
        if isinstance(answer, ApiError):
            raise answer if keyed else ApiError(503, "not_ready", "not ready; retry shortly")
        if not keyed:
            return Readiness(status="ready")
        # Neither cached: a store outage shows at once, and the figures as they are now.
        drift = {version: DriftStatus(**figures) for version, figures in self.drift.status().items()}
        capture = CaptureStatus(**self.capture.status()) if self.capture is not None else None
        return answer.model_copy(update={"capture": capture, "drift": drift})

    async def _check_chain(self) -> Readiness:
        calls = {
            "tokenizer": self.tokenizer.remote(["ready?"]),
            "classifier": self.classifier.info.remote(),
            "router": self.router.version.remote(),
        }
        try:
            tokens, info, policy = await asyncio.wait_for(asyncio.gather(*calls.values()), HEALTH_TIMEOUT_S)
        except Exception as err:  # any of them down, overloaded or too slow
            raise ApiError(
                503, "not_ready", f"the service chain is not answering ({type(err).__name__})"
            ) from err
        checks = {"tokenizer": f"{len(tokens[0])} tokens", "classifier": info["version"], "router": policy}
        return Readiness(status="ready", checks=checks)
