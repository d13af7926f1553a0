"""The Ray Serve application: Ingress (FastAPI) → Tokenizer → Classifier (batched) → Router.

`args.topology` places them (deployments/topology.py): `split`, each its own deployment with
its own replicas and autoscaling, called through DeploymentHandles; `fused`, the Ingress the
one deployment, holding the other three in process. `build_app` is the import_path target of
deployments/serve.yaml (fused) and deployments/serve-split.yaml.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ray import serve

from deployments.api import Ingress
from deployments.config import MAX_TOP_K, ClassifierConfig, Rollout, ServeArgs
from deployments.gate import BatchGate
from deployments.routing import decide_message, load_policy
from deployments.topology import place
from transferdesk.errors import TransferDeskError
from transferdesk.model.modeling import IntentModel
from transferdesk.model.prediction import Prediction
from transferdesk.registry import ModelVersion, open_version

log = logging.getLogger("ray.serve")
POLICY_CHECK_S = 2.0  # how often the router looks for an edited policy file
# Texts per forward pass on CPU, sorted by length: past a few texts a CPU pass gains nothing
# per text, while padding to the longest text and attention's square cost lose. Measured on one
# thread over random BANKING77 messages in length-sorted passes, ms a message for passes of
# 1 / 2 / 4 / 8 / 16: ONNX int8 1.86 / 1.41 / 1.44 / 2.01 / 3.20; torch 7.59 / 4.89 / 4.44 / 4.62 / 5.64.
CPU_PASS_TEXTS = 4
# Confidences in answers: 6 decimal places are plenty, and keep the JSON short.
DIGITS = 6
# Batching a replica starts with, before serve.yaml's user_config reaches reconfigure().
BATCHING = ClassifierConfig()
# One call's answer: the model version that answered (a call is never split across batches,
# so one version) and a prediction per text.
CallResult = tuple[str, list[Prediction]]
# One HTTP request's share of a Router call: its predictions, top_k, and each message's two
# requests where serving looks for them (None: one request each).
Routed = tuple[list[Prediction], int, list[list[tuple[str, float]] | None] | None]


def count_texts(calls: list[list[list[int]]]) -> int:
    """A batch's size in texts, not in calls (@serve.batch's batch_size_fn)."""
    return sum(len(call) for call in calls)


def _replica_threads() -> int:
    """One torch or ONNX Runtime thread per CPU Ray assigned to this replica (at least one)."""
    import ray

    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


# Replica counts, CPUs, autoscaling and max_ongoing_requests: deployments/serve*.yaml (and k8s/)
# alone, so the decorators hold no sizes that could contradict them.
@serve.deployment
class Tokenizer:
    """Texts → token ids: fast tokenizer, no padding (the classifier pads per batch)."""

    def __init__(self, model: str) -> None:
        self.tokenizer = IntentModel.load_tokenizer(model)
        # Cut at the encoder's limit; the classifier cuts again to its model's max_length, so a
        # switched-in model with a longer max_length still gets its full input.
        self.limit = min(int(self.tokenizer.model_max_length), 512)

    # async: Serve runs a plain method in a thread pool, a hand-over that costs more than
    # tokenizing a request's few messages on the event loop.
    async def __call__(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, truncation=True, max_length=self.limit)["input_ids"]


@dataclass(frozen=True)
class Served:
    """A loaded version: the model object, the registry's description of it, and the runtime
    it was asked for (`auto`, or the one the model runs on)."""

    model: IntentModel
    version: ModelVersion
    asked: str

    @classmethod
    def load(cls, path: str, device: str, precision: str, runtime: str, threads: int) -> Served:
        """Verified (its ONNX export too), loaded, and checked to answer a forward pass with
        finite probabilities."""
        version = open_version(path)  # resolved and verified once; the model loads from it
        model = IntentModel.from_pretrained(version, device, runtime, threads)
        model.for_serving(precision)
        model.check_forward()
        return cls(model, version, runtime)

    def serves(self, path: str, runtime: str) -> bool:
        return str(self.version.path) == path and self.asked == runtime

    def reference(self) -> dict | None:
        """What its live traffic is compared with (deployments/drift.py): the mix of decisions on
        its validation rows and their count, as training recorded them; None for a version
        trained before they were."""
        calibration = self.version.metrics.get("calibration") or {}
        mix = calibration.get("valid_intent_mix")
        return {"mix": mix, "rows": calibration.get("valid_rows")} if mix else None

    def tops(self, ids: list[list[int]]) -> tuple[float | None, list[tuple[str, float]]]:
        """Its threshold for two requests in a message (None: not calibrated for them) and the
        top intent and confidence of each tokenized text: the parts of messages' cuts
        (transferdesk/model/multi_intent.py)."""
        model = self.model
        probs = model.split_heads(model.logits_from_ids(ids)).intent
        tops = [(model.labels[i], float(c)) for i, c in zip(probs.argmax(1), probs.max(1), strict=True)]
        return model.multi_intent_threshold, tops

    def confidences(self, ids: list[list[int]], intent: str | None) -> tuple[str, list[float]] | None:
        """The confidence in `intent` (None: the top intent of the first text) on each tokenized
        text, an explanation's variants (transferdesk/model/explain.py); None: not an intent of
        this version."""
        model = self.model
        if intent is not None and intent not in model.labels:
            return None
        probs = model.split_heads(model.logits_from_ids(ids)).intent
        column = model.labels.index(intent) if intent is not None else int(probs[0].argmax())
        return model.labels[column], probs[:, column].tolist()

    def info(self) -> dict:
        model = self.model
        return {
            **self.version.summary(),
            "threshold": model.threshold,
            "calibration": {
                **model.calibration.model_dump(mode="json"),
                "fitted_temperature": model.temperature,
            },
            "runtime": model.runtime,
        }


@dataclass
class ShadowTally:
    """How a shadow version compares with the served one, over the texts both scored."""

    compared: int = 0
    disagreements: int = 0  # a different top intent
    shift: float = 0.0  # summed |confidence difference| of the top intents

    def add(self, ours: Prediction, theirs: Prediction) -> tuple[bool, float]:
        same, shift = ours.intent == theirs.intent, abs(ours.confidence - theirs.confidence)
        self.compared += 1
        self.disagreements += not same
        self.shift += shift
        return same, shift

    def summary(self) -> dict:
        n = max(self.compared, 1)
        return {
            "compared": self.compared,
            "disagreement_rate": self.disagreements / n,
            "mean_confidence_shift": self.shift / n,
        }


@serve.deployment
class Classifier:
    """Encoder + head over batches of token ids; swaps model versions without a restart, and
    serves a second version beside the first as a canary or in shadow (ClassifierConfig)."""

    def __init__(
        self,
        model: str,
        routing_policy: str,
        device: str = "auto",
        threads: int | None = None,
        precision: str = "auto",
        runtime: str = "auto",
    ) -> None:
        import torch
        from ray.serve.metrics import Counter, Histogram

        self.threads = threads or _replica_threads()
        torch.set_num_threads(self.threads)
        self.device, self.precision, self.policy_path = device, precision, routing_policy
        self.runtime = runtime  # args.runtime: what a user_config without `runtime` asks for
        self.gate = BatchGate()  # closed while a forward pass runs (deployments/gate.py)
        self.passes = asyncio.Lock()  # one batch's forward passes at a time, whoever calls
        self.max_batch_size = BATCHING.max_batch_size
        self.served = Served.load(model, device, precision, runtime, self.threads)
        self.requested = self.started_with = model
        self.requested_runtime = runtime
        self.switch_error: str | None = None
        self.rollout: Rollout | None = None
        self.second: Served | None = None  # the rollout's version, once it passed its checks
        self.rollout_error: str | None = None
        self.tally = ShadowTally()
        self.batch_sizes = Histogram(
            "transferdesk_batch_size",
            description="Texts per classifier forward pass.",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128],
            tag_keys=("model_version",),
        )
        self.shadow_counts = Counter(
            "transferdesk_shadow_predictions",
            description="Texts a shadow version scored, by agreement of its top intent with the served one.",
            tag_keys=("model_version", "agreement"),
        )
        self.shadow_shift = Histogram(
            "transferdesk_shadow_confidence_shift",
            description="|shadow - served| confidence of the top intent.",
            boundaries=[0.01, 0.02, 0.05, 0.1, 0.2, 0.5],
            tag_keys=("model_version",),
        )

    async def reconfigure(self, config: dict) -> None:
        try:
            cfg = ClassifierConfig.model_validate(config)
        except ValidationError as err:
            # Raising here would fail the replica, and Serve would restart it with the same
            # config: every replica would crash-loop. Keep serving as configured before.
            self.switch_error = f"user_config refused, the previous one stays: {err}"
            log.error("%s", self.switch_error)
            return
        self.predict.set_max_batch_size(cfg.max_batch_size)
        self.max_batch_size = cfg.max_batch_size
        self.predict.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        # Unset means args.model: what a replica started now would serve.
        path = os.path.abspath(Path(cfg.model).expanduser()) if cfg.model else self.started_with
        runtime = cfg.runtime or self.runtime
        # A refused switch is retried.
        if (path, runtime) != (self.requested, self.requested_runtime) or self.switch_error:
            await self._switch(path, runtime)
        await self._set_rollout(cfg.rollout, runtime)

    def _checked(self, path: str, runtime: str) -> Served:
        """A version loaded beside the served one, refused unless it passes its manifest (and its
        export's, for an ONNX runtime), a forward pass, the routing policy (every intent it
        predicts is routed) and the tokenizer."""
        new = Served.load(path, self.device, self.precision, runtime, self.threads)
        load_policy(self.policy_path, new.version.labels, new.version.tasks)
        if new.version.tokenizer_sha256 != self.served.version.tokenizer_sha256:
            raise TransferDeskError(
                f"{new.version.spec} uses another tokenizer than the served model; deploy it as a "
                "new application version (change `args.model`) instead of a user_config switch"
            )
        return new

    async def _load_checked(self, path: str, runtime: str, what: str) -> tuple[Served | None, str | None]:
        try:
            return await asyncio.to_thread(self._checked, path, runtime), None
        except Exception as err:  # anything (a bad path, out of memory): keep serving as before
            log.exception("%s %s refused", what, path)
            return None, str(err) if isinstance(err, TransferDeskError) else f"cannot load {path}"

    async def _switch(self, path: str, runtime: str) -> None:
        """Load beside the current model, then swap one reference: requests never wait on it.
        A version (or runtime) that fails its checks is refused and the current one keeps
        serving (see GET /v1/model). Promoting the rollout's version reuses it as it is loaded."""
        self.requested, self.requested_runtime = path, runtime
        if self.served.serves(path, runtime):  # already serving it
            self.switch_error = None
            return
        if self.second is not None and self.second.serves(path, runtime):
            new, error = self.second, None
        else:
            new, error = await self._load_checked(path, runtime, f"model switch ({runtime}) to")
        if new is None:
            self.switch_error = error
            return
        self.served, self.switch_error = new, None
        log.info("now serving %s on %s", new.version.spec, new.model.runtime)

    async def _set_rollout(self, rollout: Rollout | None, served_runtime: str) -> None:
        path = os.path.abspath(Path(rollout.model).expanduser()) if rollout else None
        runtime = (rollout.runtime if rollout else None) or served_runtime
        if path is None or self.served.serves(path, runtime):  # none, or promoted
            self.rollout = self.second = self.rollout_error = None
            return
        if self.second is None or not self.second.serves(path, runtime):
            what = f"{rollout.mode} version ({runtime})"
            second, self.rollout_error = await self._load_checked(path, runtime, what)
            self.second, self.tally = second, ShadowTally()
        self.rollout = rollout
        if self.second is not None:
            log.info("%s %s beside %s", rollout.mode, self.second.version.spec, self.served.version.spec)

    @serve.batch(
        max_batch_size=BATCHING.max_batch_size,
        batch_wait_timeout_s=BATCHING.batch_wait_timeout_s,
        batch_size_fn=count_texts,
    )
    async def predict(self, calls: list[list[list[int]]]) -> list[CallResult]:
        """The split topology's batches: calls of several Ingress replicas, together."""
        return await self._answer_batch(calls)

    async def answer(self, calls: list[list[list[int]]]) -> list[CallResult]:
        """The fused topology's Ingress calls this with its whole batch: that batch is the
        classifier's (a queue of the classifier's own would add a hand-over to every request),
        in batches of at most max_batch_size texts. Like a call of the split topology, it waits
        at the gate while another pass (an explanation's) runs."""
        await self.gate.wait()
        answers: list[CallResult] = []
        for start, end in _batch_bounds([len(call) for call in calls], self.max_batch_size):
            answers += await self._answer_batch(calls[start:end])
        return answers

    async def _answer_batch(self, calls: list[list[list[int]]]) -> list[CallResult]:
        """One forward pass over the texts of several calls (each call: up to CALL_TEXTS texts of
        one Ingress batch), and one more by the rollout's version over its calls (canary) or all
        of them (shadow); one batch at a time."""
        async with self.passes:
            # One model (and rollout) for the whole batch, even if a switch lands meanwhile.
            served, second, rollout = self.served, self.second, self.rollout
            canary = [
                second is not None and rollout.mode == "canary" and random.random() < rollout.share
                for _ in calls
            ]
            shadow = second if second is not None and rollout.mode == "shadow" else None
            for model, picked in ((served, False), (second, True)):
                if texts := sum(len(c) for c, k in zip(calls, canary, strict=True) if k is picked):
                    self.batch_sizes.observe(texts, tags={"model_version": model.version.spec})
            # In a thread, so the replica stays responsive (health checks, metrics) meanwhile.
            with self.gate.batch():
                work = (calls, served, second, canary, shadow)
                answers, shadowed = await asyncio.to_thread(self._answer, *work)
        if shadowed:
            self._tally(shadow, answers, shadowed)
        return answers

    def _answer(
        self,
        calls: list[list[list[int]]],
        served: Served,
        second: Served | None,
        canary: list[bool],
        shadow: Served | None,
    ) -> tuple[list[CallResult], list[list[Prediction]]]:
        ours = iter(_score(served, [c for c, k in zip(calls, canary, strict=True) if not k]))
        theirs = iter(
            _score(second, [c for c, k in zip(calls, canary, strict=True) if k]) if any(canary) else []
        )
        answers = [
            (second.version.spec, next(theirs)) if k else (served.version.spec, next(ours)) for k in canary
        ]
        return answers, _score(shadow, calls) if shadow is not None else []

    def _tally(self, shadow: Served, answers: list[CallResult], shadowed: list[list[Prediction]]) -> None:
        tags = {"model_version": shadow.version.spec}
        for (_, ours), theirs in zip(answers, shadowed, strict=True):
            for mine, other in zip(ours, theirs, strict=True):
                same, shift = self.tally.add(mine, other)
                self.shadow_counts.inc(tags={**tags, "agreement": "same" if same else "different"})
                self.shadow_shift.observe(shift, tags=tags)

    async def __call__(self, ids: list[list[int]]) -> CallResult:
        """The model version that answered and a prediction for each of up to CALL_TEXTS
        tokenized texts."""
        await self.gate.wait()
        return await self.predict(ids)

    async def explain(self, ids: list[list[int]], intent: str | None) -> tuple[str, str, list[float]] | None:
        """The served version, the intent explained and its confidence on each variant of one
        message (Served.confidences): one forward pass over them all, outside the batches of
        `predict`, by the served version (a canary's answers are not explained)."""
        await self.gate.wait()
        served = self.served
        with self.gate.batch():
            found = await asyncio.to_thread(served.confidences, ids, intent)
        return None if found is None else (served.version.spec, *found)

    async def tops(self, ids: list[list[int]]) -> tuple[float | None, list[tuple[str, float]]]:
        """Served.tops by the served version: where its messages hold two requests."""
        await self.gate.wait()
        served = self.served
        with self.gate.batch():
            return await asyncio.to_thread(served.tops, ids)

    def info(self) -> dict:
        rollout = None
        if self.rollout is not None:
            rollout = {
                "mode": self.rollout.mode,
                "share": self.rollout.share if self.rollout.mode == "canary" else 0.0,
                "version": self.second.version.spec if self.second else None,
                "runtime": self.second.model.runtime if self.second else None,
                "error": self.rollout_error,
                **(self.tally.summary() if self.rollout.mode == "shadow" else {}),
            }
        return {
            **self.served.info(),
            "requested": self.requested,
            "switch_error": self.switch_error,
            "rollout": rollout,
        }

    def references(self) -> dict[str, dict | None]:
        """Each version this replica serves (and its rollout's): its validation mix of decisions
        (Served.reference), for the Ingress's drift figures."""
        return {s.version.spec: s.reference() for s in (self.served, self.second) if s is not None}

    def check_health(self) -> None:
        """Fails (and Serve replaces the replica) when the model cannot answer a forward pass."""
        self.served.model.check_forward()


def _batch_bounds(sizes: list[int], limit: int) -> list[tuple[int, int]]:
    """Consecutive runs of calls (their sizes in texts) of at most `limit` texts each; a call
    larger than the limit runs alone."""
    bounds, start, texts = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and texts + size > limit:
            bounds.append((start, i))
            start, texts = i, 0
        texts += size
    return [*bounds, (start, len(sizes))] if sizes else []


def _score(served: Served, calls: list[list[list[int]]]) -> list[list[Prediction]]:
    """Predictions for the texts of each call, by one version, in length-sorted passes."""
    flat = [ids for call in calls for ids in call]
    if not flat:
        return [[] for _ in calls]
    model = served.model
    per_pass = CPU_PASS_TEXTS if model.device.type == "cpu" else len(flat)
    # The best intent and up to MAX_TOP_K alternatives: any request's top_k fits.
    predictions = iter(model.predict_ids(flat, MAX_TOP_K + 1, per_pass, DIGITS))
    return [[next(predictions) for _ in call] for call in calls]


@serve.deployment
class Router:
    """Routing decisions from predictions; reloads the policy file when it changes.

    It checks a policy's form, not its intents: which intents must be routed depends on the
    version serving, which changes under it (a switch, a canary), and the Classifier checks a
    version against the policy before it serves. An intent without a route goes to the
    fallback (`no_route`), so an edit that drops one is safe. Rules and priority_from are
    checked against the heads of the version the application started with."""

    def __init__(self, policy_path: str, tasks: dict[str, list[str]] | None = None) -> None:
        # The path as mounted, links and all: a ConfigMap swaps its `..data` link on update.
        self.path = Path(policy_path)
        # The other heads of the version the application started with: an edit with a rule on
        # a head it lacks would never fire, so it is refused like any broken edit.
        self.tasks = tasks or {}
        self.stamp = self._stamp()
        self.policy = load_policy(self.path, tasks=self.tasks)
        self.checked = time.monotonic()

    def _stamp(self) -> tuple[int, int]:
        """Of the file the path leads to now (stat follows the links): a swapped-in file differs
        in inode even where its modification time does not."""
        info = self.path.stat()
        return info.st_mtime_ns, info.st_ino

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self.checked < POLICY_CHECK_S:
            return
        self.checked = now
        try:
            stamp = self._stamp()  # before reading: an edit meanwhile is seen next time
            if stamp != self.stamp:
                self.policy, self.stamp = load_policy(self.path, tasks=self.tasks), stamp
                log.info("routing policy %s loaded", self.policy.version)
        except (TransferDeskError, OSError) as err:  # keep routing with the last good policy
            log.error("routing policy not reloaded: %s", err)

    async def __call__(self, calls: list[Routed]) -> list[list[dict]]:
        """Decisions for the predictions of each HTTP request (with its top_k and, where serving
        looks for them, each message's two requests), under one policy even if a reload lands
        meanwhile. async: as Tokenizer."""
        self._maybe_reload()
        policy = self.policy
        return [
            [
                decide_message(policy, p, top_k, r)
                for p, r in zip(predictions, found or [None] * len(predictions), strict=True)
            ]
            for predictions, top_k, found in calls
        ]

    async def thresholds(self) -> dict:
        """The policy's version and confidence thresholds (GET /v1/model)."""
        return {"version": self.policy.version, **self.policy.thresholds()}

    async def version(self) -> str:
        self._maybe_reload()
        return self.policy.version


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application for `serve run deployments/serve.yaml` (args: see ServeArgs): the Ingress
    and, in the split topology, the three deployments behind it."""
    settings = ServeArgs.model_validate(args).resolved()
    # Resolved once (a stage means the version it holds now): every replica gets the same
    # version directory. Fails fast on a missing or damaged model or a policy that cannot route it.
    version = settings.servable()
    topology = settings.topology
    tokenizer = place(Tokenizer, topology, str(version.path))
    classifier = place(
        Classifier,
        topology,
        str(version.path),
        settings.routing_policy,
        settings.device,
        settings.classifier_threads,
        settings.precision,
        settings.runtime,
    )
    router = place(Router, topology, settings.routing_policy, version.tasks)
    return Ingress.bind(tokenizer, classifier, router, settings.model_dump())
