from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deployments.cli import SERVE_YAMLS
from deployments.config import CALL_TEXTS, ClassifierConfig, ServeArgs
from deployments.routing import decide, decide_message, load_policy
from deployments.topology import check_deployments, classifier_deployment
from transferdesk.errors import TransferDeskError
from transferdesk.model.prediction import Prediction

LABELS = ["track_order", "reset_password"]
POLICY = {
    "version": "p1",
    "min_confidence": 0.6,
    "fallback": {"destination": "human-agents"},
    "routes": {"track_order": {"destination": "orders", "priority": "high"}},
    "default": {"destination": "general"},
}


def policy_file(tmp_path: Path, **changes: object) -> Path:
    data = {**POLICY, **changes}
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in data.items() if v is not None}))
    return path


def prediction(ranked: list[tuple[str, float]], out_of_scope: bool = False) -> Prediction:
    intent, confidence = ranked[0]
    return Prediction(intent, confidence, out_of_scope, "oos" if out_of_scope else intent, tuple(ranked))


@pytest.mark.parametrize(
    ("ranked", "out_of_scope", "reason", "destination"),
    [
        ([("track_order", 0.9), ("reset_password", 0.1)], False, "intent", "orders"),
        ([("reset_password", 0.9)], False, "default", "general"),
        ([("track_order", 0.5)], False, "low_confidence", "human-agents"),
        ([("track_order", 0.2)], True, "out_of_scope", "human-agents"),
        ([("track_order", 0.95)], True, "out_of_scope", "human-agents"),  # the model decides, not a number
    ],
)
def test_decisions(tmp_path: Path, ranked: list, out_of_scope: bool, reason: str, destination: str) -> None:
    decision = decide(load_policy(policy_file(tmp_path), LABELS), prediction(ranked, out_of_scope), 3)
    assert (decision["reason"], decision["destination"]) == (reason, destination)
    assert decision["handoff"] == (destination == "human-agents")
    assert len(decision["alternatives"]) == len(ranked) - 1


def test_two_requests_route_each_and_the_primary_decides(tmp_path: Path) -> None:
    whole = prediction([("reset_password", 0.5), ("track_order", 0.4)])
    found = [("reset_password", 0.9), ("track_order", 0.8)]
    # Unnamed: the higher priority first (orders: high), whatever the order or confidence.
    decision = decide_message(load_policy(policy_file(tmp_path)), whole, 1, found)
    assert (decision["intent"], decision["destination"], decision["priority"]) == (
        "track_order",
        "orders",
        "high",
    )
    assert [(r["intent"], r["destination"]) for r in decision["requests"]] == [
        ("reset_password", "general"),
        ("track_order", "orders"),
    ]
    assert decision["alternatives"] == decide(load_policy(policy_file(tmp_path)), whole, 1)["alternatives"]
    # Named in `primary`, a destination (or an intent) wins over priority.
    named = decide_message(load_policy(policy_file(tmp_path, primary=["general"])), whole, 1, found)
    assert (named["intent"], named["destination"]) == ("reset_password", "general")
    # One request: exactly decide's answer, without `requests`.
    assert decide_message(load_policy(policy_file(tmp_path)), whole, 1, None) == decide(
        load_policy(policy_file(tmp_path)), whole, 1
    )


def test_alternatives_are_cut_to_top_k(tmp_path: Path) -> None:
    ranked = [("track_order", 0.7), ("reset_password", 0.2), ("x", 0.05), ("y", 0.05)]
    decision = decide(load_policy(policy_file(tmp_path), LABELS), prediction(ranked), 2)
    assert [a["intent"] for a in decision["alternatives"]] == ["reset_password", "x"]


def test_intent_the_policy_predates_goes_to_the_fallback(tmp_path: Path) -> None:
    policy = load_policy(policy_file(tmp_path, default=None), ["track_order"])
    decision = decide(policy, prediction([("brand_new_intent", 0.99)]), 3)
    assert (decision["reason"], decision["destination"]) == ("no_route", "human-agents")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"routes": {"no_such_intent": {"destination": "x"}}}, "does not know: no_such_intent"),
        ({"fallback": None}, "fallback"),
        ({"default": None}, "no route for reset_password"),
        ({"min_confidence": 2}, "min_confidence"),
        ({"routes": {"track_order": {"destination": "x", "priority": "asap"}}}, "priority"),
    ],
)
def test_bad_policies_are_refused(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(TransferDeskError, match=message):
        load_policy(policy_file(tmp_path, **changes), LABELS)


@pytest.mark.parametrize(
    ("confidence", "intent", "reason", "destination"),
    [
        (0.85, "track_order", "intent", "orders"),  # the route's own 0.8
        (0.75, "track_order", "queue_threshold", "human-agents"),
        (0.75, "reset_password", "default", "general"),  # the policy's 0.6
        (0.95, "cancel_order", "intent", "orders"),  # the orders queue's 0.9
        (0.88, "cancel_order", "queue_threshold", "human-agents"),
        (0.55, "cancel_order", "low_confidence", "human-agents"),  # the policy's comes first
    ],
)
def test_per_queue_thresholds(
    tmp_path: Path, confidence: float, intent: str, reason: str, destination: str
) -> None:
    routes = {
        "track_order": {"destination": "orders", "min_confidence": 0.8},
        "cancel_order": {"destination": "orders"},
    }
    path = policy_file(tmp_path, routes=routes, queues={"orders": {"min_confidence": 0.9}})
    policy = load_policy(path, [*LABELS, "cancel_order"])
    decision = decide(policy, prediction([(intent, confidence)]), 3)
    assert (decision["reason"], decision["destination"]) == (reason, destination)
    assert decision["handoff"] == (destination == "human-agents")
    assert policy.thresholds() == {
        "min_confidence": 0.6,
        "queues": {"orders": 0.9},
        "routes": {"track_order": 0.8},
    }


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"queues": {"oders": {"min_confidence": 0.9}}},
            r"queues oders: no route or default goes there \(destinations: general, orders\)",
        ),
        ({"fallback": {"destination": "h", "min_confidence": 0.5}}, "not the fallback"),
        ({"queues": {"orders": {"min_confidence": 1.5}}}, "less than or equal to 1"),
    ],
)
def test_bad_thresholds_are_refused(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(TransferDeskError, match=message):
        load_policy(policy_file(tmp_path, **changes), LABELS)


def test_missing_policy_file(tmp_path: Path) -> None:
    with pytest.raises(TransferDeskError, match="cannot read routing policy"):
        load_policy(tmp_path / "nope.yaml", LABELS)


@pytest.mark.parametrize("topology", ["fused", "split"])
def test_serve_yaml_args_are_valid_serve_args(topology: str) -> None:
    app = yaml.safe_load(SERVE_YAMLS[topology].read_text())["applications"][0]
    args = ServeArgs.model_validate(app["args"])
    assert args.topology == topology
    assert not args.auth.disabled and not args.log_texts  # safe defaults in the committed config
    check_deployments(app, topology)  # the topology's deployments, each sized
    holder = classifier_deployment(app)
    assert holder["max_ongoing_requests"] > holder["user_config"]["max_batch_size"]
    ClassifierConfig.model_validate(holder["user_config"])


def test_the_two_serve_configs_differ_only_in_their_deployments() -> None:
    fused, split = (yaml.safe_load(SERVE_YAMLS[t].read_text()) for t in ("fused", "split"))
    for config in (fused, split):
        config["applications"][0]["args"].pop("topology")
        config["applications"][0].pop("deployments")
    assert fused == split
    fused_ingress, split_classifier = (
        classifier_deployment(yaml.safe_load(SERVE_YAMLS[t].read_text())["applications"][0])
        for t in ("fused", "split")
    )
    assert fused_ingress["user_config"] == split_classifier["user_config"]


def test_a_batch_must_hold_one_ingress_call() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        ClassifierConfig(max_batch_size=CALL_TEXTS - 1)


HEADS = {"sentiment": ["negative", "neutral", "positive"], "urgency": ["low", "normal", "high", "urgent"]}
RULES = {
    "rules": [
        {
            "name": "upset-customer",
            "task": "sentiment",
            "label": "negative",
            "min_confidence": 0.8,
            "route": {"destination": "customer-care", "priority": "high"},
        }
    ],
    "priority_from": {"task": "urgency", "min_confidence": 0.6},
}


def headed(intent: float, sentiment: tuple[str, float], urgency: tuple[str, float]) -> Prediction:
    return Prediction(
        "track_order",
        intent,
        False,
        "track_order",
        (("track_order", intent),),
        {"sentiment": sentiment, "urgency": urgency},
    )


@pytest.mark.parametrize(
    ("prediction_", "reason", "destination", "priority", "handoff"),
    [
        # The rule fires at its confidence, with its own reason, whatever the intent's route.
        (headed(0.9, ("negative", 0.85), ("normal", 0.9)), "rule", "customer-care", "high", True),
        (headed(0.9, ("negative", 0.7), ("normal", 0.9)), "intent", "orders", "high", False),
        (headed(0.9, ("positive", 0.99), ("low", 0.9)), "intent", "orders", "high", False),
        # The urgency head raises the route's priority (never lowers it), when confident.
        (headed(0.9, ("neutral", 0.9), ("urgent", 0.7)), "intent", "orders", "urgent", False),
        (headed(0.9, ("neutral", 0.9), ("urgent", 0.5)), "intent", "orders", "high", False),
        (headed(0.9, ("negative", 0.99), ("urgent", 0.9)), "rule", "customer-care", "urgent", True),
        # Out-of-scope and low confidence go to the fallback first; still prioritised.
        (headed(0.3, ("negative", 0.99), ("urgent", 0.9)), "low_confidence", "human-agents", "urgent", True),
    ],
)
def test_rules_and_priority_from_other_heads(
    tmp_path: Path, prediction_: Prediction, reason: str, destination: str, priority: str, handoff: bool
) -> None:
    policy = load_policy(policy_file(tmp_path, **RULES), LABELS, HEADS)
    decision = decide(policy, prediction_, 3)
    assert (decision["reason"], decision["destination"], decision["priority"], decision["handoff"]) == (
        reason,
        destination,
        priority,
        handoff,
    )
    assert decision["rule"] == ("upset-customer" if reason == "rule" else None)
    assert decision["tasks"]["sentiment"]["label"] == prediction_.tasks["sentiment"][0]


@pytest.mark.parametrize(
    ("changes", "heads", "message"),
    [
        (
            {},
            {"urgency": HEADS["urgency"]},
            "uses head 'sentiment', which the model does not have; its other heads: urgency",
        ),
        (
            {},
            {**HEADS, "sentiment": ["bad", "good"]},
            "waits for sentiment 'negative', a label the model's sentiment head",
        ),
        ({}, {"sentiment": HEADS["sentiment"]}, "priority_from uses head 'urgency'"),
        ({}, {**HEADS, "urgency": ["asap", "later"]}, "no priority for asap, later; map them under `levels`"),
        (
            {"priority_from": {"task": "urgency", "levels": {"asap": "urgent", "later": "low"}}},
            {**HEADS, "urgency": ["asap", "later"]},
            None,
        ),
    ],
)
def test_policies_on_heads_the_model_lacks_are_refused(
    tmp_path: Path, changes: dict, heads: dict, message: str | None
) -> None:
    path = policy_file(tmp_path, **{**RULES, **changes})
    if message is None:
        assert load_policy(path, LABELS, heads).priority_from.level("asap") == "urgent"
        return
    with pytest.raises(TransferDeskError, match=message.replace("(", r"\(")):
        load_policy(path, LABELS, heads)
