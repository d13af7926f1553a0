"""The routing policy: which queue (team, skill) and priority each intent goes to, and when a
message goes to a human agent instead. Plain functions; the Router deployment wraps them."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError

from transferdesk.config import Section
from transferdesk.errors import TransferDeskError
from transferdesk.prediction import Prediction

Priority = Literal["low", "normal", "high", "urgent"]


class Route(Section):
    destination: str = Field(min_length=1, description="Queue, team or skill name.")
    priority: Priority = "normal"


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


def load_policy(path: str | Path, labels: list[str] | None = None) -> RoutingPolicy:
    """Read and validate a policy, and against a model's intents when given (every intent
    routed, no route for an intent the model does not know)."""
    try:
        policy = RoutingPolicy.model_validate(yaml.safe_load(Path(path).read_text()) or {})
    except OSError as err:
        raise TransferDeskError(f"cannot read routing policy {path}: {err.strerror}") from None
    except (yaml.YAMLError, ValidationError) as err:
        raise TransferDeskError(f"routing policy {path} is invalid: {err}") from None
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


def decide(policy: RoutingPolicy, prediction: Prediction, alternatives: int) -> dict:
    """One routing decision from the model's prediction (its out-of-scope flag included)."""
    intent, confidence = prediction.intent, prediction.confidence
    if prediction.out_of_scope:
        reason, route = "out_of_scope", policy.fallback
    elif confidence < policy.min_confidence:
        reason, route = "low_confidence", policy.fallback
    elif intent in policy.routes:
        reason, route = "intent", policy.routes[intent]
    elif policy.default is not None:
        reason, route = "default", policy.default
    else:  # a model switched in with an intent the policy predates
        reason, route = "no_route", policy.fallback
    return {
        "intent": intent,
        "confidence": confidence,
        "destination": route.destination,
        "priority": route.priority,
        "handoff": route is policy.fallback,
        "reason": reason,
        "alternatives": [{"intent": i, "confidence": c} for i, c in prediction.alternatives[:alternatives]],
        "policy_version": policy.version,
    }
