import numpy as np
import pytest
from scipy.special import softmax

from transferdesk.config import CalibrationConfig, build_config
from transferdesk.errors import TransferDeskError
from transferdesk.model.confidence import (
    choose_threshold,
    fit_temperature,
    handoff_curve,
    operating_point,
    reliability,
)
from transferdesk.model.scores import SCORES


def overconfident(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a 5-class model right about 70% of the time, scaled up 6× so that its top
    probability is near 1 almost always."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 5, rows)
    logits = rng.normal(0, 1, (rows, 5))
    logits[np.arange(rows), targets] += 1.2
    return 6 * logits, targets


def test_temperature_scaling_lowers_calibration_error_on_held_out_rows() -> None:
    valid, valid_targets = overconfident(2000, 0)
    test, test_targets = overconfident(2000, 1)
    before = reliability(softmax(test, axis=1), test_targets)["ece"]
    t = fit_temperature(valid, valid_targets)
    after = reliability(softmax(test / t, axis=1), test_targets)["ece"]
    assert t > 3  # it undoes most of the 6× scaling
    assert before > 0.15 and after < 0.05
    # Temperature never changes the top class.
    assert np.array_equal(softmax(test / t, axis=1).argmax(1), test.argmax(1))


def test_no_temperature_where_validation_has_no_error() -> None:
    logits = np.array([[3.0, 0.0], [0.0, 2.0]])
    assert fit_temperature(logits, np.array([0, 1])) == 1.0  # else it would shrink without end


def synthetic_scores(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores of in-scope rows (higher when right) and 20% out-of-scope rows (lower)."""
    rng = np.random.default_rng(seed)
    is_oos = rng.random(rows) < 0.2
    correct = ~is_oos & (rng.random(rows) < 0.85)
    score = rng.normal(0, 1, rows) + 1.5 * correct - 1.0 * is_oos
    return score, correct, is_oos


@pytest.mark.parametrize("target,value", [("handoff_rate", 0.10), ("precision", 0.95), ("oos_recall", 0.8)])
def test_target_chosen_on_validation_holds_on_held_out_data(target: str, value: float) -> None:
    valid, test = synthetic_scores(4000, 0), synthetic_scores(4000, 1)
    point = choose_threshold(*valid, target, value)
    achieved_valid = point.value(target)
    assert achieved_valid is not None
    assert (achieved_valid >= value) if target != "handoff_rate" else (achieved_valid <= value)
    assert abs(achieved_valid - value) < 0.01  # as little hand-off as the target allows
    held_out = operating_point(*test, point.threshold).value(target)
    assert held_out == pytest.approx(value, abs=0.03)


@pytest.mark.parametrize("target,value", [("handoff_rate", 0.10), ("precision", 0.95), ("oos_recall", 0.8)])
def test_interval_says_where_traffic_like_validation_can_be(target: str, value: float) -> None:
    # The value the threshold really has: measured on 200,000 rows like validation's.
    population = synthetic_scores(200_000, 99)
    covered, widths = [], []
    for seed in range(100):
        valid = synthetic_scores(500, seed)  # about 100 out-of-scope rows
        point = choose_threshold(*valid, target, value)
        low, high = point.target_interval
        truth = operating_point(*population, point.threshold).value(target)
        covered.append(low <= truth <= high)
        widths.append(high - low)
    assert 0.88 <= np.mean(covered) <= 0.995  # a 95% interval
    # Measured on the rows the target is a share of: in-scope, routed, out-of-scope.
    score, _, is_oos = valid
    rows = {"handoff_rate": ~is_oos, "precision": score >= point.threshold, "oos_recall": is_oos}[target]
    assert point.target == target and point.target_rows == rows.sum()
    assert low <= point.value(target) <= high
    if target == "oos_recall":
        assert 0.12 < np.mean(widths) < 0.2  # about 100 rows: ±8 points
    # Twenty times the rows: a far narrower interval.
    wide = choose_threshold(*synthetic_scores(10_000, 0), target, value).target_interval
    assert wide[1] - wide[0] < np.mean(widths) / 3


def test_balance_has_no_interval_and_curve_points_no_target() -> None:
    score, correct, is_oos = synthetic_scores(1000, 4)
    point = choose_threshold(score, correct, is_oos, "balance", None)
    assert point.target_interval is None and "target_rows" not in point.to_dict()
    # Without out-of-scope rows balance is a hand-off rate, with its interval.
    plain = choose_threshold(score, correct, np.zeros(1000, bool), "balance", None)
    assert plain.target == "handoff_rate" and plain.target_rows == 1000
    assert all("target_interval" not in row for row in handoff_curve(score, correct, is_oos))


def test_balance_without_out_of_scope_rows_hands_off_one_in_twenty() -> None:
    score, correct, _ = synthetic_scores(1000, 2)
    point = choose_threshold(score, correct, np.zeros(1000, bool), "balance", None)
    assert point.handoff_rate == pytest.approx(0.05, abs=0.002) and point.oos_recall is None


def test_balance_with_out_of_scope_rows_separates_them() -> None:
    score, correct, is_oos = synthetic_scores(2000, 3)
    point = choose_threshold(score, correct, is_oos, "balance", None)
    assert 0.5 < point.oos_recall < 1.0 and point.handoff_rate < 0.5


def test_unreachable_precision_is_refused_with_what_is_reachable() -> None:
    score = np.array([0.9, 0.8, 0.7, 0.6])
    correct = np.array([False, True, True, False])  # the most confident row is wrong
    with pytest.raises(TransferDeskError, match=r"the most it reaches is 0\.667, handing off 25\.0%"):
        choose_threshold(score, correct, np.zeros(4, bool), "precision", 1.0)


def test_out_of_scope_recall_target_needs_out_of_scope_rows() -> None:
    score, correct, _ = synthetic_scores(100, 4)
    with pytest.raises(TransferDeskError, match="needs out-of-scope rows"):
        choose_threshold(score, correct, np.zeros(100, bool), "oos_recall", 0.9)


def test_target_and_value_go_together() -> None:
    assert CalibrationConfig(target="precision", value=0.9).value == 0.9
    with pytest.raises(TransferDeskError, match="needs a value"):
        build_config({"calibration": {"target": "handoff_rate"}})
    with pytest.raises(TransferDeskError, match="takes no value"):
        build_config({"calibration": {"value": 0.2}})


def test_energy_keeps_the_scale_softmax_normalises_away() -> None:
    logits = np.array([[4.0, 0.0], [1.0, -3.0]])  # the same margin, very different evidence
    softmax_score = SCORES["softmax"](logits, 1.0)
    assert np.allclose(softmax_score[0], softmax_score[1])
    energy = SCORES["energy"](logits, 1.0)
    assert energy[0] > energy[1] + 2.5


def test_handoff_curve_rises_from_no_hand_off() -> None:
    curve = handoff_curve(*synthetic_scores(2000, 5))
    assert curve[0]["handoff_rate"] == 0.0 and curve[-1]["handoff_rate"] > 0.9
    rates = [row["handoff_rate"] for row in curve]
    assert rates == sorted(rates)
    # Handing off the least confident makes what is routed more often right.
    assert curve[10]["precision"] > curve[0]["precision"] + 0.1
