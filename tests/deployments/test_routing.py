from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deployments.config import CALL_TEXTS, ClassifierConfig, ServeArgs
from deployments.routing import decide, load_policy
from transferdesk.errors import TransferDeskError
from transferdesk.prediction import Prediction

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


def test_missing_policy_file(tmp_path: Path) -> None:
    with pytest.raises(TransferDeskError, match="cannot read routing policy"):
        load_policy(tmp_path / "nope.yaml", LABELS)


def test_serve_yaml_args_are_valid_serve_args() -> None:
    config = yaml.safe_load((Path(__file__).parents[2] / "deployments" / "serve.yaml").read_text())
    args = ServeArgs.model_validate(config["applications"][0]["args"])
    assert not args.auth.disabled and not args.log_texts  # safe defaults in the committed config
    names = {d["name"] for d in config["applications"][0]["deployments"]}
    assert names == {"Ingress", "Tokenizer", "Classifier", "Router"}
    classifier = next(d for d in config["applications"][0]["deployments"] if d["name"] == "Classifier")
    assert classifier["max_ongoing_requests"] > classifier["user_config"]["max_batch_size"]
    ClassifierConfig.model_validate(classifier["user_config"])


def test_a_batch_must_hold_one_ingress_call() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        ClassifierConfig(max_batch_size=CALL_TEXTS - 1)
