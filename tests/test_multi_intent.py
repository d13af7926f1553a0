"""Two requests in one message (transferdesk/model/multi_intent.py): cuts, the threshold chosen
on single messages, a calibrated version that finds both requests of a joined message, and
`transferdesk predict --multi-intent`."""

import json
from pathlib import Path

import pytest

from tests.conftest import TOY_INTENTS
from transferdesk.cli.main import main
from transferdesk.errors import TransferDeskError
from transferdesk.model.modeling import IntentModel
from transferdesk.model.multi_intent import Cut, choose_threshold, cuts, find_requests, requests
from transferdesk.registry import open_version

PAIR = "where is my parcel and forgot my password"


def test_cuts_leave_two_words_on_either_side() -> None:
    assert cuts("a b c d e") == [("a b", "c d e", 4), ("a b c", "d e", 6)]
    assert cuts("a b c") == []


def test_the_threshold_lets_through_at_most_the_share_asked() -> None:
    singles = [Cut(0, ("a", s), ("b", s)) for s in (0.9, 0.5, 0.3)] + [Cut(0, ("a", 0.99), ("a", 0.99)), None]
    assert Cut(0, ("a", 0.9), ("b", 0.4)).score == pytest.approx(0.6)
    threshold = choose_threshold(singles, 0.2)  # one of five may split: the 0.9 one
    assert 0.5 < threshold <= 0.9
    assert [requests(cut, threshold) is not None for cut in singles] == [True, False, False, False, False]
    assert requests(singles[0], None) is None  # not calibrated: one request


def test_a_calibrated_version_finds_both_requests_in_order(toy_version: Path) -> None:
    version = open_version(toy_version)
    model = IntentModel.from_pretrained(version)
    assert model.multi_intent_threshold == version.metrics["calibration"]["multi_intent"]["threshold"]
    found = find_requests(model, [PAIR, "forgot my password and where is my parcel"])
    assert [[intent for intent, _ in f] for f in found] == [
        ["track_order", "reset_password"],
        ["reset_password", "track_order"],
    ]
    singles = [text for texts in TOY_INTENTS.values() for text in texts[5:8]]
    assert sum(f is not None for f in find_requests(model, singles)) <= 0.02 * len(singles) + 1


def test_predict_multi_intent_on_the_command_line(toy_version: Path, tiny_config, capsys) -> None:
    assert main(["predict", str(toy_version), PAIR, "where is my parcel", "--multi-intent", "--json"]) == 0
    pair, single = json.loads(capsys.readouterr().out)
    assert [r["intent"] for r in pair["requests"]] == ["track_order", "reset_password"]
    assert "requests" not in single  # a single request: today's answer, unchanged
    uncalibrated = IntentModel.from_backbone(tiny_config.model.backbone, ["a", "b"], tiny_config.model)
    with pytest.raises(TransferDeskError, match="multi_intent_rows"):
        find_requests(uncalibrated, [PAIR])
