"""The Ray Serve application: Ingress (FastAPI) → Tokenizer → Classifier (batched) → Router.

Each is its own deployment with its own replicas and autoscaling; they call one another
through DeploymentHandles. `build_app` is the import_path target of deployments/serve.yaml.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

from deployments.api import Ingress
from deployments.config import ClassifierConfig, ServeArgs
from deployments.routing import decide, load_policy
from transferdesk.errors import TransferDeskError
from transferdesk.registry import MANIFEST, load_model, resolve_model_dir

log = logging.getLogger("ray.serve")
TOKENIZER_FILE = "encoder/tokenizer.json"
POLICY_CHECK_S = 2.0  # how often the router looks for an edited policy file
# Texts per forward pass on CPU, sorted by length: past ~8 short texts a CPU pass gains almost
# nothing per text, while padding a mixed batch to its longest text wastes compute (measured on
# 2 threads: 16 random messages in one pass 257/s, in two length-sorted passes of 8 286/s).
CPU_PASS_TEXTS = 8


def count_texts(calls: list[list[list[int]]]) -> int:
    """A batch's size in texts, not in calls (@serve.batch's batch_size_fn)."""
    return sum(len(call) for call in calls)


def _torch_threads() -> int:
    """One torch thread per CPU Ray assigned to this replica (at least one)."""
    import ray

    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


def model_summary(path: str) -> dict:
    """Labels, version and metrics of a registry version, without loading its weights."""
    root = resolve_model_dir(path)
    info = json.loads((root / "model.json").read_text())
    manifest = json.loads((root / MANIFEST).read_text())
    metrics = json.loads((root / "metrics.json").read_text())
    return {
        "name": manifest.get("name"),
        "version": f"{manifest.get('name')}/v{manifest.get('version')}",
        "path": str(root),
        "labels": info["labels"],
        "threshold": info["threshold"],
        "tokenizer_sha256": manifest["files"].get(TOKENIZER_FILE),
        "metrics": {k: metrics[k] for k in ("accuracy", "macro_f1") if k in metrics},
    }


@serve.deployment(
    ray_actor_options={"num_cpus": 0.25},
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8},
)
class Tokenizer:
    """Texts → token ids: fast tokenizer, no padding (the classifier pads per batch)."""

    def __init__(self, model: str) -> None:
        from transformers import AutoTokenizer

        summary = model_summary(model)
        self.tokenizer = AutoTokenizer.from_pretrained(str(Path(summary["path"]) / "encoder"))
        # Cut at the encoder's limit; the classifier cuts again to its model's max_length, so a
        # switched-in model with a longer max_length still gets its full input.
        self.limit = min(int(self.tokenizer.model_max_length), 512)

    def __call__(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, truncation=True, max_length=self.limit)["input_ids"]


@serve.deployment(
    ray_actor_options={"num_cpus": 1},
    # Above max_batch_size, so a replica holds enough requests to fill a batch.
    max_ongoing_requests=48,
    # Defaults when serve.yaml sets none; reconfigure() needs a user_config to be called at all.
    user_config=ClassifierConfig().model_dump(exclude_none=True),
    autoscaling_config={
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 16,
        "upscale_delay_s": 5,
        "downscale_delay_s": 120,
    },
    health_check_period_s=10,
)
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
        self.served = self._load(model)
        self.requested = model
        self.switch_error: str | None = None
        self.batch_sizes = Histogram(
            "transferdesk_batch_size",
            description="Texts per classifier forward pass.",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128],
            tag_keys=("model_version",),
        )

    def _load(self, path: str) -> dict:
        model, _, _ = load_model(path, self.device)  # verifies the manifest first
        model.for_serving(self.precision)
        return {"model": model, **model_summary(path)}

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
            new = await asyncio.to_thread(self._load, path)
            if new["tokenizer_sha256"] != self.served["tokenizer_sha256"]:
                raise TransferDeskError(
                    f"{new['version']} uses another tokenizer than the served model; deploy it as a "
                    "new application version (change `args.model`) instead of a user_config switch"
                )
        except Exception as err:  # anything (a bad path, out of memory): keep serving the old model
            self.switch_error = str(err) if isinstance(err, TransferDeskError) else f"cannot load {path}"
            log.exception("model switch to %s refused", path)
            return
        self.served, self.switch_error = new, None
        log.info("now serving %s", new["version"])

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0, batch_size_fn=count_texts)
    async def predict(self, calls: list[list[list[int]]]) -> list[list[dict]]:
        """One forward pass over the texts of several calls (each call: one request's texts)."""
        served = self.served  # one model for the whole batch, even if a switch lands meanwhile
        flat = [ids for call in calls for ids in call]
        self.batch_sizes.observe(len(flat), tags={"model_version": served["version"]})
        # In a thread, so the replica stays responsive (health checks, metrics) meanwhile.
        self.idle.clear()
        try:
            model = served["model"]
            per_pass = CPU_PASS_TEXTS if model.device.type == "cpu" else len(flat)
            probs = await asyncio.to_thread(model.proba_from_ids, flat, per_pass)
        finally:
            self.idle.set()
        ranked = iter([self._ranked(served, p) for p in probs])
        return [[next(ranked) for _ in call] for call in calls]

    @staticmethod
    def _ranked(served: dict, probs: np.ndarray, k: int = 11) -> dict:  # top_k ≤ 10 alternatives
        order = np.argsort(-probs)[:k]
        labels = served["labels"]
        return {
            "model_version": served["version"],
            "threshold": served["threshold"],
            "top": [(labels[i], round(float(probs[i]), 6)) for i in order],
        }

    async def __call__(self, ids: list[list[int]]) -> list[dict]:
        """Ranked intents for up to CALL_TEXTS tokenized texts."""
        await self.idle.wait()
        return await self.predict(ids)

    def info(self) -> dict:
        summary = {k: v for k, v in self.served.items() if k != "model"}
        return {**summary, "requested": self.requested, "switch_error": self.switch_error}

    def check_health(self) -> None:
        """Fails (and Serve replaces the replica) when the model cannot answer a forward pass."""
        tok = self.served["model"].tokenizer
        probs = self.served["model"].proba_from_ids([[tok.cls_token_id, tok.sep_token_id]])
        if not np.isfinite(probs).all():
            raise RuntimeError("the model returns non-finite probabilities")


@serve.deployment(
    ray_actor_options={"num_cpus": 0.1},
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16},
)
class Router:
    """Routing decisions from ranked intents; reloads the policy file when it changes."""

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

    def __call__(self, predictions: list[dict], top_k: int) -> list[dict]:
        self._maybe_reload()
        policy = self.policy  # one policy for the whole request, even if a reload lands meanwhile
        return [decide(policy, p["top"][: top_k + 1], p["threshold"]) for p in predictions]

    def version(self) -> str:
        self._maybe_reload()
        return self.policy.version


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application for `serve run deployments/serve.yaml` (args: see ServeArgs)."""
    settings = ServeArgs.model_validate(args).resolved()
    summary = model_summary(settings.model)  # fails fast on a missing model
    load_policy(settings.routing_policy, summary["labels"])  # and on a bad routing policy
    tokenizer = Tokenizer.bind(settings.model)
    classifier = Classifier.bind(
        settings.model, settings.device, settings.classifier_threads, settings.precision
    )
    router = Router.bind(settings.routing_policy, summary["labels"])
    return Ingress.bind(tokenizer, classifier, router, settings.model_dump())
