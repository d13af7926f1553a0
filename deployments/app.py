"""The Ray Serve application: Ingress (FastAPI) → Tokenizer → Classifier (batched) → Router.

Each is its own deployment with its own replicas and autoscaling; they call one another
through DeploymentHandles. `build_app` is the import_path target of deployments/serve.yaml.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve

from deployments.api import Ingress
from deployments.config import MAX_TOP_K, ClassifierConfig, ServeArgs
from deployments.routing import decide, load_policy
from transferdesk.errors import TransferDeskError
from transferdesk.modeling import IntentModel, Prediction
from transferdesk.registry import ModelVersion, open_version

log = logging.getLogger("ray.serve")
POLICY_CHECK_S = 2.0  # how often the router looks for an edited policy file
# Texts per forward pass on CPU, sorted by length: past ~8 short texts a CPU pass gains almost
# nothing per text, while padding a mixed batch to its longest text wastes compute (measured on
# 2 threads: 16 random messages in one pass 257/s, in two length-sorted passes of 8 286/s).
CPU_PASS_TEXTS = 8
# Batching a replica starts with, before serve.yaml's user_config reaches reconfigure().
BATCHING = ClassifierConfig()
# One call's answer: the model version that answered (a call is never split across batches,
# so one version) and a prediction per text.
CallResult = tuple[str, list[Prediction]]


def count_texts(calls: list[list[list[int]]]) -> int:
    """A batch's size in texts, not in calls (@serve.batch's batch_size_fn)."""
    return sum(len(call) for call in calls)


def _torch_threads() -> int:
    """One torch thread per CPU Ray assigned to this replica (at least one)."""
    import ray

    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


# Replica counts, CPUs, autoscaling and max_ongoing_requests: deployments/serve.yaml (and k8s/)
# alone, so the decorators hold no sizes that could contradict it.
@serve.deployment
class Tokenizer:
    """Texts → token ids: fast tokenizer, no padding (the classifier pads per batch)."""

    def __init__(self, model: str) -> None:
        self.tokenizer = IntentModel.load_tokenizer(model)
        # Cut at the encoder's limit; the classifier cuts again to its model's max_length, so a
        # switched-in model with a longer max_length still gets its full input.
        self.limit = min(int(self.tokenizer.model_max_length), 512)

    def __call__(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, truncation=True, max_length=self.limit)["input_ids"]


@dataclass(frozen=True)
class Served:
    """A loaded version: the model object and the registry's description of it."""

    model: IntentModel
    version: ModelVersion

    @classmethod
    def load(cls, path: str, device: str, precision: str) -> Served:
        version = open_version(path)  # resolved and verified once; the model loads from it
        model = IntentModel.from_pretrained(version, device)
        model.for_serving(precision)
        return cls(model, version)

    def info(self) -> dict:
        return {**self.version.summary(), "threshold": self.model.threshold}


@serve.deployment
class Classifier:
    """Encoder + head over batches of token ids; swaps model versions without a restart."""

    def __init__(
        self, model: str, device: str = "auto", threads: int | None = None, precision: str = "auto"
    ) -> None:
        import torch
        from ray.serve.metrics import Histogram

        torch.set_num_threads(threads or _torch_threads())
        self.device, self.precision = device, precision
        # Closed while a forward pass runs: calls that arrive meanwhile wait here, then enter
        # @serve.batch together and form the next batch. (@serve.batch forms the next batch as
        # soon as one is handed over, so without the gate a busy replica runs batches of one.)
        self.idle = asyncio.Event()
        self.idle.set()
        self.served = Served.load(model, device, precision)
        self.requested = model
        self.switch_error: str | None = None
        self.batch_sizes = Histogram(
            "transferdesk_batch_size",
            description="Texts per classifier forward pass.",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128],
            tag_keys=("model_version",),
        )

    async def reconfigure(self, config: dict) -> None:
        cfg = ClassifierConfig.model_validate(config)
        self.predict.set_max_batch_size(cfg.max_batch_size)
        self.predict.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        if cfg.model:
            path = str(Path(cfg.model).expanduser().resolve())
            if path != self.requested or self.switch_error:  # a refused switch is retried
                await self._switch(path)

    async def _switch(self, path: str) -> None:
        """Load beside the current model, then swap one reference: requests never wait on it.
        A bad version is refused and the current one keeps serving (see GET /v1/model)."""
        self.requested = path
        try:
            new = await asyncio.to_thread(Served.load, path, self.device, self.precision)
            if new.version.tokenizer_sha256 != self.served.version.tokenizer_sha256:
                raise TransferDeskError(
                    f"{new.version.spec} uses another tokenizer than the served model; deploy it as a "
                    "new application version (change `args.model`) instead of a user_config switch"
                )
        except Exception as err:  # anything (a bad path, out of memory): keep serving the old model
            self.switch_error = str(err) if isinstance(err, TransferDeskError) else f"cannot load {path}"
            log.exception("model switch to %s refused", path)
            return
        self.served, self.switch_error = new, None
        log.info("now serving %s", new.version.spec)

    @serve.batch(
        max_batch_size=BATCHING.max_batch_size,
        batch_wait_timeout_s=BATCHING.batch_wait_timeout_s,
        batch_size_fn=count_texts,
    )
    async def predict(self, calls: list[list[list[int]]]) -> list[CallResult]:
        """One forward pass over the texts of several calls (each call: one request's texts)."""
        served = self.served  # one model for the whole batch, even if a switch lands meanwhile
        flat = [ids for call in calls for ids in call]
        self.batch_sizes.observe(len(flat), tags={"model_version": served.version.spec})
        # In a thread, so the replica stays responsive (health checks, metrics) meanwhile.
        self.idle.clear()
        try:
            model = served.model
            per_pass = CPU_PASS_TEXTS if model.device.type == "cpu" else len(flat)
            # The best intent and up to MAX_TOP_K alternatives: any request's top_k fits.
            predictions = await asyncio.to_thread(model.predict_ids, flat, MAX_TOP_K + 1, per_pass)
        finally:
            self.idle.set()
        answers = iter(predictions)
        return [(served.version.spec, [next(answers) for _ in call]) for call in calls]

    async def __call__(self, ids: list[list[int]]) -> CallResult:
        """The model version and a prediction for each of up to CALL_TEXTS tokenized texts."""
        await self.idle.wait()
        return await self.predict(ids)

    def info(self) -> dict:
        return {**self.served.info(), "requested": self.requested, "switch_error": self.switch_error}

    def check_health(self) -> None:
        """Fails (and Serve replaces the replica) when the model cannot answer a forward pass."""
        self.served.model.check_forward()


@serve.deployment
class Router:
    """Routing decisions from predictions; reloads the policy file when it changes."""

    def __init__(self, policy_path: str, labels: list[str]) -> None:
        self.path, self.labels = Path(policy_path), labels
        self.policy = load_policy(self.path, labels)
        self.mtime = self.path.stat().st_mtime
        self.checked = time.monotonic()

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self.checked < POLICY_CHECK_S:
            return
        self.checked = now
        try:
            mtime = self.path.stat().st_mtime  # before reading: an edit meanwhile is seen next time
            if mtime != self.mtime:
                self.policy, self.mtime = load_policy(self.path, self.labels), mtime
                log.info("routing policy %s loaded", self.policy.version)
        except (TransferDeskError, OSError) as err:  # keep routing with the last good policy
            log.error("routing policy not reloaded: %s", err)

    def __call__(self, predictions: list[Prediction], top_k: int) -> list[dict]:
        self._maybe_reload()
        policy = self.policy  # one policy for the whole request, even if a reload lands meanwhile
        return [decide(policy, p, top_k) for p in predictions]

    def version(self) -> str:
        self._maybe_reload()
        return self.policy.version


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application for `serve run deployments/serve.yaml` (args: see ServeArgs)."""
    settings = ServeArgs.model_validate(args).resolved()
    # Resolved once (a model directory means its newest version): every deployment gets the
    # same version directory. Fails fast on a missing or damaged model.
    version = open_version(settings.model)
    load_policy(settings.routing_policy, version.labels)  # and on a bad routing policy
    tokenizer = Tokenizer.bind(str(version.path))
    classifier = Classifier.bind(
        str(version.path), settings.device, settings.classifier_threads, settings.precision
    )
    router = Router.bind(settings.routing_policy, version.labels)
    return Ingress.bind(tokenizer, classifier, router, settings.model_dump())
