import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon

from transferdesk.evaluation.drift import DriftWindow, intent_mix, js_divergence, null_divergence

REFERENCE = {"a": 0.5, "b": 0.3, "oos": 0.2}


def test_intent_mix_is_the_share_of_each_label() -> None:
    assert intent_mix(["a", "b", "a", "oos"]) == {"a": 0.5, "b": 0.25, "oos": 0.25}
    assert intent_mix([]) == {}


def test_js_divergence_is_scipys_distance_squared_in_bits() -> None:
    p, q = np.array([5.0, 3.0, 0.0, 2.0]), np.array([0.1, 0.1, 0.4, 0.4])
    assert js_divergence(p, q) == pytest.approx(jensenshannon(p, q, base=2) ** 2)
    assert js_divergence(p, p) == pytest.approx(0.0)
    assert js_divergence(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(1.0)
    rows = np.array([[1.0, 1.0, 0.0, 0.0], p])  # rows broadcast against one reference
    assert js_divergence(rows, q) == pytest.approx([js_divergence(rows[0], q), js_divergence(p, q)])


def test_the_window_counts_its_last_messages() -> None:
    window = DriftWindow(4, REFERENCE)
    window.add("oos", 0.2, True, routed=True, handoff_reason="out_of_scope")
    window.add("a", 0.9, False, routed=True)
    window.add("b", 0.5, False, routed=True, handoff_reason="low_confidence")
    window.add("a", 0.8, False)  # /v1/classify: no routing decision
    figures = window.figures()
    assert (figures.messages, figures.routed) == (4, 3)
    assert figures.out_of_scope_rate == 0.25
    assert figures.mean_confidence == pytest.approx(0.6)
    assert figures.handoff_rates == pytest.approx({"low_confidence": 1 / 3, "out_of_scope": 1 / 3})
    expected = js_divergence(np.array([2.0, 1, 1]), np.array([0.5, 0.3, 0.2]))
    assert figures.divergence == pytest.approx(expected)
    window.add("a", 0.7, False, routed=True)  # the out-of-scope message leaves the window
    figures = window.figures()
    assert figures.out_of_scope_rate == 0.0 and figures.routed == 3
    # a reason that left the window reads 0, so that its exported rate falls back
    assert figures.handoff_rates == pytest.approx({"low_confidence": 1 / 3, "out_of_scope": 0.0})
    assert figures.mean_confidence == pytest.approx((0.9 + 0.5 + 0.8 + 0.7) / 4)


def test_no_divergence_without_a_reference_or_before_the_window_fills() -> None:
    window = DriftWindow(3)
    for _ in range(5):
        window.add("a", 0.9, False)
    assert window.figures().divergence is None and window.figures().mean_confidence == pytest.approx(0.9)
    partial = DriftWindow(3, REFERENCE)
    partial.add("a", 0.9, False)
    assert partial.figures().divergence is None
    expected = js_divergence(np.array([1.0, 0, 0]), np.array([0.5, 0.3, 0.2]))
    assert partial.divergence() == pytest.approx(expected)  # on request, whatever the fill
    assert DriftWindow(3).figures().mean_confidence == 0.0  # empty: no division by zero


def test_labels_the_validation_rows_never_got_count_against_the_reference() -> None:
    window = DriftWindow(2, {"a": 1.0})
    window.add("new", 0.4, False)
    window.add("new", 0.4, False)
    assert window.figures().divergence == pytest.approx(1.0)


def test_a_window_matching_the_reference_diverges_by_zero() -> None:
    window = DriftWindow(10, REFERENCE)
    for label, n in (("a", 5), ("b", 3), ("oos", 2)):
        for _ in range(n):
            window.add(label, 0.5, label == "oos")
    assert window.figures().divergence == pytest.approx(0.0, abs=1e-12)


def _mix(intents: int, oos: float) -> dict[str, float]:
    return {**{f"intent_{i}": (1 - oos) / intents for i in range(intents)}, "oos": oos}


def test_null_divergence_follows_the_finite_sample_formula() -> None:
    reference, window, rows = _mix(69, 0.1), 2000, 1500
    mean_theory = 69 * (1 / window + 1 / rows) / (8 * np.log(2))
    median = null_divergence(reference, window, rows, quantile=0.5, draws=2000)
    assert median == pytest.approx(mean_theory, rel=0.1)
    # the reference's own noise counts: an exact reference lowers the floor
    exact = null_divergence(reference, window, None, draws=2000)
    assert exact < null_divergence(reference, window, rows, draws=2000)


def test_a_window_refuses_no_room() -> None:
    with pytest.raises(ValueError, match="at least one"):
        DriftWindow(0)
