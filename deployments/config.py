"""Settings of the serving application: the `args` of deployments/serve.yaml, validated
before any replica starts. The model's own RunConfig travels inside its registry version."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from transferdesk.config import RUNTIME_HELP, Runtime, Section
from transferdesk.errors import TransferDeskError
from transferdesk.model.runtime import choose_runtime
from transferdesk.registry import VERSION_RE, ModelVersion, open_version, split_stage
from transferdesk.review.database import STORE_ENV, STORE_FILE_ENV, absolute_sqlite, check_url, store_url
from transferdesk.review.redaction import RedactionConfig

log = logging.getLogger("ray.serve")
KEYS_ENV = "TRANSFERDESK_API_KEYS"  # comma-separated keys
KEYS_FILE_ENV = "TRANSFERDESK_API_KEYS_FILE"  # a file with one key per line (a mounted Secret)
MIN_KEY_CHARS = 16
KEYS_CHECK_S = 2.0  # how often the key file is looked at for a rotation
CALL_TEXTS = 8  # texts per Ingress → Classifier call; a batch must hold at least one call
MAX_TOP_K = 10  # alternatives a request may ask for; the Classifier ranks this many and one more
# Ray Serve's high-throughput data path, read by Ray's processes at start (so environment, not
# serve.yaml): HAProxy in place of the Python HTTP proxy, forwarding straight to the Ingress
# replicas, and gRPC between deployments. On 2 cores it halved the Ingress's CPU per request
# and took the Python proxy's 6 ms a request away. The throughput mode would also hold up to
# 1,000 log records before writing them (at low traffic, for hours): written at once instead.
# Replica logs go to Serve's log files, not to `serve run`'s terminal (RAY_SERVE_LOG_TO_STDERR=1
# puts them there too, at a measured 10% of single-message throughput on 2 cores).
# k8s/ sets the same on the Ray containers.
FAST_PATH_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
    # The controller checks each proxy every this many seconds and replaces it after three
    # failures: at the default 10 s a killed HAProxy meant about 30 s without an answer.
    "RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S": "2",
    # A starting proxy gets this long to say it is ready (Ray's default 5 s), else it is killed
    # and, at `serve run`'s start, the command fails: on a busy 2-core node HAProxy's manager
    # took longer. A proxy that starts sooner is not held back.
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30",
}


def exact_version(value: str | None) -> str | None:
    if value is not None and not is_exact_version(value):
        raise ValueError(f"{value!r}: name an exact version, registry/<name>/v<N>")
    return value


class Rollout(Section):
    """A second version beside the served one: `canary` answers a share of the calls with it,
    `shadow` scores every call with both and answers with the served one, counting where they
    disagree. Promote it by making it `model` (and removing this); roll back by removing this."""

    model: str = Field(description="Exact registry version (registry/<name>/v<N>).")
    mode: Literal["canary", "shadow"] = Field(
        "canary", description="canary: answers `share`; shadow: scores only."
    )
    share: float = Field(0.1, ge=0, le=1, description="Canary: the share of calls it answers.")
    runtime: Runtime | None = Field(
        None, description="Its runtime; unset: the served one's setting. Canary int8 against torch so."
    )

    @field_validator("model")
    @classmethod
    def _exact(cls, value: str | None) -> str | None:
        return exact_version(value)


class ClassifierConfig(Section):
    """The classifier's user_config: batching, and `model` to switch versions in place; on the
    Ingress deployment in the fused topology (deployments/serve.yaml), on the Classifier in the
    split one (deployments/serve-split.yaml). Changes reach the running replicas without a
    restart; the defaults here are the batching a replica starts with."""

    max_batch_size: int = Field(
        16, ge=CALL_TEXTS, le=256, description=f"Texts per forward pass at most (at least {CALL_TEXTS})."
    )
    batch_wait_timeout_s: float = Field(
        0.0,
        ge=0,
        le=1,
        description="How long a batch waits to fill before it runs anyway (the split topology's "
        "Classifier; fused, the Ingress's batches never wait).",
    )
    model: str | None = Field(
        None,
        description="Exact registry version (registry/<name>/v<N>) to switch to; unset: args.model. "
        "Not a stage or model directory: a replica restarted later would resolve it anew.",
    )

    runtime: Runtime | None = Field(
        None, description=f"Switch runtimes in place: {RUNTIME_HELP}. Unset: args.runtime."
    )
    rollout: Rollout | None = Field(None, description="A canary or shadow version beside `model`.")

    @field_validator("model")
    @classmethod
    def _exact(cls, value: str | None) -> str | None:
        return exact_version(value)


class Limits(Section):
    max_text_chars: int = Field(1000, ge=1, description="Longest accepted message, in characters.")
    max_batch_texts: int = Field(64, ge=1, description="Most texts in one request.")
    max_body_bytes: int = Field(
        256 * 1024, ge=1024, description="Largest accepted request body, counted as it arrives."
    )
    body_timeout_s: float = Field(
        10.0, gt=0, le=120, description="A request body not received in this long gets 408 (slow clients)."
    )
    request_timeout_s: float = Field(
        10.0, gt=0, le=120, description="A request the deployments have not answered in this long gets 503."
    )


class ExplainLimits(Section):
    """POST /v1/explain costs a forward pass per word of its message: limits of its own."""

    max_words: int = Field(
        64, ge=1, le=512, description="Most words in a message to explain (each is one more forward pass)."
    )
    max_concurrent: int = Field(
        2,
        ge=1,
        description="Explanations under way at once per Ingress replica; past it, 503 with Retry-After, "
        "so that explanations never crowd out classification.",
    )


class MultiIntentSettings(Section):
    """Two requests in one message (transferdesk/model/multi_intent.py): each message cut in two
    at every word, both parts scored; for a version trained with calibration.multi_intent_rows."""

    enabled: bool = Field(
        False,
        description="Look for two requests in each message (two forward passes per word). A decision "
        "then lists both under `requests` and is the primary one's (the routing policy's `primary`); "
        "a message with one request is answered exactly as without.",
    )


class Coalescing(Section):
    """How the Ingress gathers concurrent requests into one call of each deployment."""

    max_texts: int = Field(
        64, ge=1, le=1024, description="Texts of the requests one Ingress batch gathers at most."
    )


class Auth(Section):
    disabled: bool = Field(
        False, description="Accept requests without an API key. For local development only."
    )


class Docs(Section):
    exposure: Literal["public", "keyed", "off"] = Field(
        "keyed",
        description="/docs, /redoc and /openapi.json: for anyone, for API-key holders only, or not served.",
    )


class CaptureSettings(Section):
    """Capture of live messages for the review page (deployments/capture.py)."""

    enabled: bool = Field(False, description="Record handed-off messages and a sample of the rest.")
    store: str = Field(
        "sqlite:///capture.db",
        description=f"SQLAlchemy URL of the store: sqlite:///FILE, or postgresql+psycopg://user@host/db for "
        f"several pods. ${STORE_ENV} or the file ${STORE_FILE_ENV} names, where set, takes "
        "precedence (keeps the password out of the config).",
    )
    sample_rate: float = Field(
        0.02, ge=0, le=1, description="Share of the messages not handed off that are captured too."
    )
    max_pending: int = Field(
        10000, ge=1, description="Messages held in memory awaiting the store; past it they are lost, counted."
    )
    batch_size: int = Field(200, ge=1, le=10000, description="Messages per write at most.")
    flush_interval_s: float = Field(1.0, gt=0, le=60, description="How often queued messages are written.")
    redaction: RedactionConfig = Field(
        default_factory=RedactionConfig, description="Personal data removed before a message is stored."
    )

    @field_validator("store")
    @classmethod
    def _database(cls, value: str) -> str:
        try:
            return check_url(value)
        except TransferDeskError as err:
            raise ValueError(str(err)) from None

    def url(self) -> str:
        return store_url(self.store)


class DriftSettings(Section):
    """Rolling figures of live traffic per model version, exported to Prometheus
    (deployments/drift.py), and the thresholds of the alerts k8s/render.py writes from them into
    the PrometheusRule: defined here only. Defaults and how they were chosen:
    docs/operations.md#drift."""

    window: int = Field(
        2000,
        ge=100,
        le=100_000,
        description="Messages each figure is computed over (the last ones, per Ingress replica and "
        "version). A count, not a time: the divergence's noise floor falls as 1/window, so a fixed "
        "count gives one threshold at any traffic. Longer: less noise, slower to fill and to react.",
    )
    export_interval_s: float = Field(
        5.0, gt=0, le=300, description="How often the figures are recomputed and exported (on a request)."
    )
    divergence_alert: float = Field(
        0.025,
        gt=0,
        le=1,
        description="Alert above this Jensen–Shannon divergence (bits) of the live decisions' mix from "
        "the validation one: above what unchanged traffic reaches in 99.9% of windows for ~70 intents, "
        "2,000 messages and 1,500 validation rows; more intents or fewer rows need more.",
    )
    handoff_rate_alert: float = Field(
        0.3, gt=0, le=1, description="Alert above this share of routed messages handed to people (any cause)."
    )
    out_of_scope_rate_alert: float = Field(
        0.2, gt=0, le=1, description="Alert above this share of messages below the out-of-scope threshold."
    )
    mean_confidence_alert: float = Field(
        0.5, gt=0, le=1, description="Alert below this mean confidence of the top intent."
    )
    alert_for_minutes: int = Field(
        15,
        ge=1,
        le=1440,
        description="How long a figure stays past its threshold before its alert fires (the rule's `for`).",
    )


# Where the tokenizer, classifier and router run (deployments/topology.py).
Topology = Literal["fused", "split"]


class ServeArgs(Section):
    topology: Topology = Field(
        "fused",
        description="fused: one deployment (the Ingress) tokenizes, classifies and routes in process, "
        "scaling as one; for CPU nodes, where a hop between deployments costs more than the model's "
        "work. split: Ingress, Tokenizer, Classifier and Router deployments, for a classifier on GPU "
        "workers. Each has its Serve config: deployments/serve.yaml and deployments/serve-split.yaml.",
    )
    model: str = Field(
        "registry/northwind-tuned@production",
        description="The version to serve: a stage (registry/<name>@production) or an exact version "
        "(registry/<name>/v<N>), resolved once when the application is deployed.",
    )
    routing_policy: str = Field("deployments/policies/northwind.yaml", description="Routing policy YAML.")
    device: str = Field("auto", description="auto (a GPU when one is assigned), cpu, cuda or cuda:N.")
    top_k: int = Field(3, ge=1, le=MAX_TOP_K, description="Alternatives returned with each answer.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Of the classifier's forward passes. auto: bf16 or fp16 on a GPU, fp32 on CPU. "
        "bf16 on CPU is ~1.7x faster where the CPU has AVX512-BF16 or AMX (see README).",
    )
    runtime: Runtime = Field("auto", description=f"Of the classifier's forward passes: {RUNTIME_HELP}.")
    classifier_threads: int | None = Field(
        None,
        ge=1,
        description="torch or ONNX Runtime (intra-op) threads per classifier replica (unset: the CPUs Ray "
        "assigned it).",
    )
    limits: Limits = Limits()
    explain: ExplainLimits = ExplainLimits()
    multi_intent: MultiIntentSettings = MultiIntentSettings()
    coalescing: Coalescing = Coalescing()
    auth: Auth = Auth()
    docs: Docs = Docs()
    log_texts: bool = Field(
        False, description="Write message texts to the logs. They are personal data: off by default."
    )
    capture: CaptureSettings = CaptureSettings()
    drift: DriftSettings = DriftSettings()

    @field_validator("model")
    @classmethod
    def _pinned(cls, value: str) -> str:
        if split_stage(value)[1] is None and not is_exact_version(value):
            raise ValueError(
                f"{value!r} is a model directory: name a stage (<dir>@production) or an exact version "
                "(<dir>/v<N>), or replicas started later would serve whatever version is newest"
            )
        return value

    @model_validator(mode="after")
    def _one_request_fits_a_batch(self) -> ServeArgs:
        if self.coalescing.max_texts < self.limits.max_batch_texts:
            raise ValueError(
                f"coalescing.max_texts ({self.coalescing.max_texts}) must hold the largest request "
                f"(limits.max_batch_texts: {self.limits.max_batch_texts})"
            )
        return self

    def resolved(self) -> ServeArgs:
        """Absolute paths: replicas do not share the working directory of `serve run`. Links
        are kept as they are: a Kubernetes ConfigMap mount is a chain of links whose target
        differs per pod and changes on every update."""
        update: dict = {
            k: os.path.abspath(Path(getattr(self, k)).expanduser()) for k in ("model", "routing_policy")
        }
        update["capture"] = self.capture.model_copy(update={"store": absolute_sqlite(self.capture.store)})
        return self.model_copy(update=update)

    def servable(self) -> ModelVersion:
        """The version to serve, after what the application needs of it: sound files, an export
        for an ONNX runtime, a routing policy that routes its intents and asks only its heads.
        build_app checks this before any replica starts, and `transferdesk serve` before it
        starts Serve, which would otherwise retry a build that cannot succeed for ever."""
        from deployments.routing import load_policy

        version = open_version(self.model)
        choose_runtime(version, self.runtime, self.device)
        try:
            load_policy(self.routing_policy, version.labels, version.tasks)
        except TransferDeskError as err:
            raise TransferDeskError(
                f"{err}\n{version.spec} cannot be served with this routing policy: give one written for "
                "its intents and heads (--policy FILE; deployments/policies/ has examples)"
            ) from None
        return version


def is_exact_version(spec: str) -> bool:
    """registry/<name>/v<N>: one sealed version, never re-resolved."""
    return split_stage(spec)[1] is None and VERSION_RE.match(Path(spec).name) is not None


def serve_env() -> dict[str, str]:
    """The environment for `serve run`: FAST_PATH_ENV unless the caller set those variables."""
    return {**FAST_PATH_ENV, **os.environ}


def api_keys() -> list[bytes]:
    """Keys from $TRANSFERDESK_API_KEYS and the file named by $TRANSFERDESK_API_KEYS_FILE,
    each at least MIN_KEY_CHARS long (a short key is a guessable key)."""
    keys = os.environ.get(KEYS_ENV, "").split(",")
    if path := os.environ.get(KEYS_FILE_ENV):
        keys += Path(path).read_text().splitlines()
    found = [k.strip() for k in keys if k.strip()]
    if short := [k for k in found if len(k) < MIN_KEY_CHARS]:
        raise TransferDeskError(
            f"{len(short)} API key(s) shorter than {MIN_KEY_CHARS} characters; use random keys, e.g. "
            "`openssl rand -hex 24`"
        )
    return [k.encode() for k in found]


class KeyRing:
    """The accepted API keys, read again when the key file changes (a rotated Kubernetes Secret
    reaches a mounted file within a minute), so that a revoked key stops working without a
    restart. A change that empties or breaks the file fails closed: no key is accepted (the
    service answers 503) until the file holds good keys again, since keeping the old ones
    would keep a revoked key working."""

    def __init__(self) -> None:
        self.keys = api_keys()
        if not self.keys:
            raise TransferDeskError(
                f"no API keys: set {KEYS_ENV} (comma-separated) or {KEYS_FILE_ENV} (a file, one key a "
                "line), or set auth.disabled: true for local development"
            )
        self.error: str | None = None  # why no key is accepted now
        self.stamp, self.checked = self._stamp(), time.monotonic()

    @staticmethod
    def _stamp() -> tuple[float, int] | None:
        path = os.environ.get(KEYS_FILE_ENV)
        try:  # stat follows the links of a Secret mount: their target changes on rotation
            return (os.stat(path).st_mtime, os.stat(path).st_ino) if path else None
        except OSError:
            return None

    def current(self) -> list[bytes]:
        now = time.monotonic()
        if now - self.checked >= KEYS_CHECK_S:
            self.checked = now
            if (stamp := self._stamp()) != self.stamp:
                self.stamp = stamp
                try:
                    keys = api_keys()
                    if not keys:
                        raise TransferDeskError("the key file holds no key")
                    self.keys, self.error = keys, None
                    log.info("API keys reloaded (%d keys)", len(keys))
                except (OSError, TransferDeskError) as err:
                    self.keys, self.error = [], f"the API keys cannot be read: {err}"
                    log.error("%s; no key is accepted until the key file is fixed", self.error)
        return self.keys
