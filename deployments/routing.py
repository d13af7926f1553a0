"""The routing policy: which queue (team, skill) and priority each intent goes to, and when a
message goes to a human agent instead; with a model of several heads, rules on the other
tasks' answers (negative sentiment to a named queue) and the priority from one of them (the
urgency head). Plain functions; the Router deployment wraps them."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

import yaml
from pydantic import Field, ValidationError, model_validator

from transferdesk.config import Section
from transferdesk.errors import TransferDeskError
from transferdesk.model.prediction import Prediction

Priority = Literal["low", "normal", "high", "urgent"]
PRIORITIES: tuple[str, ...] = get_args(Priority)


class Route(Section):
    destination: str = Field(min_length=1, description="Queue, team or skill name.")
    priority: Priority = "normal"
    min_confidence: float | None = Field(
        None,
        ge=0,
        le=1,
        description="An intent's route only: below this confidence its messages go to the fallback "
        "instead (reason `queue_threshold`); unset: the queue's, else the policy's.",
    )


class Queue(Section):
    min_confidence: float = Field(
        ge=0,
        le=1,
        description="Messages routed here by intent need this confidence, else they go to the fallback "
        "(reason `queue_threshold`): stricter for payments than for sales.",
    )


class Rule(Section):
    """Where a message goes when another head's answer says so (checked in order, after the
    out-of-scope and min_confidence checks, before the intent's route)."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="The decision's `rule` when it fires."
    )
    task: str = Field(description="The head, e.g. sentiment.")
    label: str = Field(description="Its answer that fires the rule, e.g. negative.")
    min_confidence: float = Field(0.5, ge=0, le=1, description="Fires only at this confidence or above.")
    route: Route
    handoff: bool = Field(True, description="The queue is staffed by people: the decision is a hand-off.")


class PriorityFrom(Section):
    """The priority a head gives (the urgency head): the higher of it and the route's."""

    task: str = Field(description="The head, e.g. urgency.")
    min_confidence: float = Field(0.5, ge=0, le=1, description="Below this the route's priority stands.")
    levels: dict[str, Priority] | None = Field(
        None, description="The head's label → priority; unset: the labels are priorities (low … urgent)."
    )

    def level(self, label: str) -> str | None:
        return (self.levels or {}).get(label, label if label in PRIORITIES else None)


class RoutingPolicy(Section):
    version: str = Field(min_length=1, description="Shown by GET /v1/model; bump it on every change.")
    min_confidence: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Below this confidence a message goes to the fallback (business rule). The "
        "model's own out-of-scope decision, calibrated on validation data, applies first.",
    )
    fallback: Route = Field(description="Where low-confidence and out-of-scope messages go: human agents.")
    default: Route | None = Field(None, description="Route for intents not listed; unset: list every intent.")
    routes: dict[str, Route] = Field(default_factory=dict)
    queues: dict[str, Queue] = Field(
        default_factory=dict,
        description="Per destination: its confidence threshold (routes may set their own).",
    )
    rules: list[Rule] = Field(default_factory=list, description="Rules on other heads' answers, in order.")
    priority_from: PriorityFrom | None = Field(None, description="Raise priorities from a head's answer.")
    primary: list[str] = Field(
        default_factory=list,
        description="A message with two requests (serving's multi_intent): which one its decision is, "
        "the other listed beside it. The first destination or intent named here that either request "
        "has; neither named: the higher priority, then the more confident.",
    )

    @model_validator(mode="after")
    def _thresholds_where_they_apply(self) -> RoutingPolicy:
        # Thresholds gate routing by intent: a fallback or a rule's route has none to gate.
        if self.fallback.min_confidence is not None:
            raise ValueError("fallback: min_confidence applies to routes chosen by intent, not the fallback")
        if named := [rule.name for rule in self.rules if rule.route.min_confidence is not None]:
            raise ValueError(
                f"rules {', '.join(named)}: min_confidence of a rule goes on the rule, not its route"
            )
        routed = {route.destination for route in self.routes.values()}
        routed |= {self.default.destination} if self.default else set()
        if unknown := sorted(set(self.queues) - routed):
            raise ValueError(
                f"queues {', '.join(unknown)}: no route or default goes there "
                f"(destinations: {', '.join(sorted(routed))})"
            )
        return self

    def required(self, route: Route) -> float:
        """The confidence a message routed by intent needs for `route`: the route's own, else
        its queue's, else the policy's."""
        if route.min_confidence is not None:
            return route.min_confidence
        queue = self.queues.get(route.destination)
        return queue.min_confidence if queue else self.min_confidence

    def thresholds(self) -> dict:
        """Every confidence threshold, for GET /v1/model."""
        return {
            "min_confidence": self.min_confidence,
            "queues": {name: queue.min_confidence for name, queue in self.queues.items()},
            "routes": {
                intent: route.min_confidence
                for intent, route in self.routes.items()
                if route.min_confidence is not None
            },
        }


def load_policy(
    path: str | Path, labels: list[str] | None = None, tasks: dict[str, list[str]] | None = None
) -> RoutingPolicy:
    """Read and validate a policy, and against a model's intents and other heads (task →
    labels) when given: every intent routed, no route for an intent the model does not know,
    no rule on a head or label it lacks, a priority for each label of the priority head."""
    try:
        policy = RoutingPolicy.model_validate(yaml.safe_load(Path(path).read_text()) or {})
    except OSError as err:
        raise TransferDeskError(f"cannot read routing policy {path}: {err.strerror}") from None
    except (yaml.YAMLError, ValidationError) as err:
        raise TransferDeskError(f"routing policy {path} is invalid: {err}") from None
    if tasks is not None:
        _check_heads(policy, path, tasks)
    if labels is None:
        return policy
    unknown = sorted(set(policy.routes) - set(labels))
    if unknown:
        raise TransferDeskError(
            f"routing policy {path} routes intents the model does not know: {', '.join(unknown)}"
        )
    unrouted = sorted(set(labels) - set(policy.routes))
    if unrouted and policy.default is None:
        raise TransferDeskError(
            f"routing policy {path} has no route for {', '.join(unrouted)}; add them or set `default`"
        )
    return policy


def narrowed(policy: RoutingPolicy, labels: list[str], tasks: dict[str, list[str]]) -> RoutingPolicy:
    """A policy written for another model, made to fit this one: routes of intents it does not
    know and rules (and priorities) on heads or labels it lacks dropped; its intents without a
    route sent to the fallback, people, as any message the policy cannot place."""
    rules = [r for r in policy.rules if r.label in tasks.get(r.task, [])]
    priority = policy.priority_from if policy.priority_from and policy.priority_from.task in tasks else None
    routes = {intent: route for intent, route in policy.routes.items() if intent in labels}
    routed = {route.destination for route in routes.values()} | {policy.fallback.destination}
    return policy.model_copy(
        update={
            "version": f"{policy.version}-narrowed",
            "routes": routes,
            "default": policy.default or policy.fallback,
            "queues": {name: queue for name, queue in policy.queues.items() if name in routed},
            "rules": rules,
            "priority_from": priority,
        }
    )


def _check_heads(policy: RoutingPolicy, path: str | Path, tasks: dict[str, list[str]]) -> None:
    heads = ", ".join(f"{task} ({', '.join(labels)})" for task, labels in tasks.items()) or "none"
    for rule in policy.rules:
        if rule.task not in tasks:
            raise TransferDeskError(
                f"routing policy {path}: rule {rule.name} uses head {rule.task!r}, which the model "
                f"does not have; its other heads: {heads}"
            )
        if rule.label not in tasks[rule.task]:
            raise TransferDeskError(
                f"routing policy {path}: rule {rule.name} waits for {rule.task} {rule.label!r}, a label "
                f"the model's {rule.task} head does not give ({', '.join(tasks[rule.task])})"
            )
    if (source := policy.priority_from) is not None:
        if source.task not in tasks:
            raise TransferDeskError(
                f"routing policy {path}: priority_from uses head {source.task!r}, which the model does "
                f"not have; its other heads: {heads}"
            )
        if missing := [label for label in tasks[source.task] if source.level(label) is None]:
            raise TransferDeskError(
                f"routing policy {path}: priority_from {source.task}: no priority for {', '.join(missing)}; "
                f"map them under `levels` to one of {', '.join(PRIORITIES)}"
            )


def decide(policy: RoutingPolicy, prediction: Prediction, alternatives: int) -> dict:
    """One routing decision from the model's prediction (its out-of-scope flag and other heads'
    answers included)."""
    intent, confidence = prediction.intent, prediction.confidence
    rule = None
    if prediction.out_of_scope:
        reason, route = "out_of_scope", policy.fallback
    elif confidence < policy.min_confidence:
        reason, route = "low_confidence", policy.fallback
    elif (rule := _fired(policy, prediction)) is not None:
        reason, route = "rule", rule.route
    elif intent in policy.routes:
        reason, route = "intent", policy.routes[intent]
    elif policy.default is not None:
        reason, route = "default", policy.default
    else:  # a model switched in with an intent the policy predates
        reason, route = "no_route", policy.fallback
    if reason in ("intent", "default") and confidence < policy.required(route):
        reason, route = "queue_threshold", policy.fallback
    return {
        "intent": intent,
        "confidence": confidence,
        "destination": route.destination,
        "priority": _priority(policy, prediction, route.priority),
        "handoff": route is policy.fallback or (rule is not None and rule.handoff),
        "reason": reason,
        "rule": rule.name if rule else None,
        "alternatives": [{"intent": i, "confidence": c} for i, c in prediction.alternatives[:alternatives]],
        "tasks": {task: {"label": label, "confidence": c} for task, (label, c) in prediction.tasks.items()},
        "policy_version": policy.version,
    }


def decide_message(
    policy: RoutingPolicy,
    prediction: Prediction,
    alternatives: int,
    requests: list[tuple[str, float]] | None = None,
) -> dict:
    """A message's decision: `decide`'s, or with two requests (multi_intent.py) the decision of
    the primary one (`policy.primary`), with every request's decision under `requests`, in the
    message's order. A message with one request gets exactly `decide`'s answer."""
    if not requests:
        return decide(policy, prediction, alternatives)
    # Each request on its own: the other heads' answers are the whole message's.
    each = [
        decide(
            policy,
            Prediction(intent, confidence, False, intent, ((intent, confidence),), prediction.tasks),
            0,
        )
        for intent, confidence in requests
    ]
    primary = min(range(len(each)), key=lambda i: _precedence(policy, each[i]))
    listed = [
        {k: d[k] for k in ("intent", "confidence", "destination", "priority", "handoff", "reason")}
        for d in each
    ]
    alternatives_of = decide(policy, prediction, alternatives)["alternatives"]
    return {**each[primary], "alternatives": alternatives_of, "requests": listed}


def _precedence(policy: RoutingPolicy, decision: dict) -> tuple[int, int, float]:
    """How a request ranks for the primary decision: named first in policy.primary, then the
    higher priority, then the more confident (lower sorts first)."""
    named = [
        i for i, name in enumerate(policy.primary) if name in (decision["destination"], decision["intent"])
    ]
    return (
        named[0] if named else len(policy.primary),
        -PRIORITIES.index(decision["priority"]),
        -decision["confidence"],
    )


def _fired(policy: RoutingPolicy, prediction: Prediction) -> Rule | None:
    """The first rule whose head gave its label at its confidence (a head the model lacks,
    after a policy edit, fires nothing)."""
    for rule in policy.rules:
        label, confidence = prediction.tasks.get(rule.task, (None, 0.0))
        if label == rule.label and confidence >= rule.min_confidence:
            return rule
    return None


def _priority(policy: RoutingPolicy, prediction: Prediction, priority: str) -> str:
    """The route's priority, raised to the priority head's where it is confident enough."""
    source = policy.priority_from
    if source is None or source.task not in prediction.tasks:
        return priority
    label, confidence = prediction.tasks[source.task]
    level = source.level(label)
    if confidence < source.min_confidence or level is None:
        return priority
    return max(priority, level, key=PRIORITIES.index)
