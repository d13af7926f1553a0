"""Settings of the serving application: the `args` of deployments/serve.yaml, validated
before any replica starts. The model's own RunConfig travels inside its registry version."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field

from transferdesk.config import Section

KEYS_ENV = "TRANSFERDESK_API_KEYS"  # comma-separated keys
KEYS_FILE_ENV = "TRANSFERDESK_API_KEYS_FILE"  # a file with one key per line (a mounted Secret)
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
}


class ClassifierConfig(Section):
    """The Classifier's user_config (deployments/serve.yaml): batching, and `model` to switch
    versions in place. Changes reach the running replicas without a restart; the defaults
    here are the batching a replica starts with."""

    max_batch_size: int = Field(
        16, ge=CALL_TEXTS, le=256, description=f"Texts per forward pass at most (at least {CALL_TEXTS})."
    )
    batch_wait_timeout_s: float = Field(
        0.0, ge=0, le=1, description="How long a batch waits to fill before it runs anyway."
    )
    model: str | None = Field(None, description="Registry version to switch to (unset: args.model).")


class Limits(Section):
    max_text_chars: int = Field(1000, ge=1, description="Longest accepted message, in characters.")
    max_batch_texts: int = Field(64, ge=1, description="Most texts in one request.")
    max_body_bytes: int = Field(256 * 1024, ge=1024, description="Largest accepted request body.")


class Auth(Section):
    disabled: bool = Field(
        False, description="Accept requests without an API key. For local development only."
    )


class ServeArgs(Section):
    model: str = Field(
        "registry/northwind-tuned",
        description="Registry version directory, or a model directory meaning its newest version.",
    )
    routing_policy: str = Field("deployments/policies/northwind.yaml", description="Routing policy YAML.")
    device: str = Field("auto", description="auto (a GPU when one is assigned), cpu, cuda or cuda:N.")
    top_k: int = Field(3, ge=1, le=MAX_TOP_K, description="Alternatives returned with each answer.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Of the classifier's forward passes. auto: bf16 or fp16 on a GPU, fp32 on CPU. "
        "bf16 on CPU is ~1.7x faster where the CPU has AVX512-BF16 or AMX (see README).",
    )
    classifier_threads: int | None = Field(
        None, ge=1, description="torch threads per classifier replica (unset: the CPUs Ray assigned it)."
    )
    limits: Limits = Limits()
    auth: Auth = Auth()
    log_texts: bool = Field(
        False, description="Write message texts to the logs. They are personal data: off by default."
    )

    def resolved(self) -> ServeArgs:
        """Absolute paths: replicas do not share the working directory of `serve run`."""
        update = {k: str(Path(getattr(self, k)).expanduser().resolve()) for k in ("model", "routing_policy")}
        return self.model_copy(update=update)


def serve_env() -> dict[str, str]:
    """The environment for `serve run`: FAST_PATH_ENV unless the caller set those variables."""
    return {**FAST_PATH_ENV, **os.environ}


def api_keys() -> list[bytes]:
    """Keys from $TRANSFERDESK_API_KEYS and the file named by $TRANSFERDESK_API_KEYS_FILE."""
    keys = os.environ.get(KEYS_ENV, "").split(",")
    if path := os.environ.get(KEYS_FILE_ENV):
        keys += Path(path).read_text().splitlines()
    return [k.strip().encode() for k in keys if k.strip()]
