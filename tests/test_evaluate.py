from pathlib import Path

import numpy as np
import pytest

from transferdesk.config import CalibrationConfig
from transferdesk.data import Dataset
from transferdesk.evaluation.metrics import auroc, classification_metrics, oos_metrics
from transferdesk.evaluation.report import most_confused, write_evaluation
from transferdesk.model.confidence import handoff_curve, operating_point, reliability


def test_classification_metrics_by_hand() -> None:
    true = ["a", "a", "b", "b", "c"]
    pred = ["a", "b", "b", "b", "a"]
    m = classification_metrics(true, pred, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["per_intent"]["a"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert m["per_intent"]["b"]["precision"] == pytest.approx(2 / 3)
    assert m["per_intent"]["c"]["f1"] == 0.0
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_auroc_matches_definition() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.3, 0.2])
    assert auroc(scores, np.array([True, True, False, False, False])) == 1.0
    assert auroc(scores, np.array([False, False, True, True, True])) == 0.0
    # 1 of the 2×2 positive/negative pairs is ordered wrongly
    assert auroc(np.array([0.9, 0.5, 0.6, 0.1]), np.array([True, True, False, False])) == 0.75
    assert auroc(np.array([0.5, 0.5]), np.array([True, False])) == 0.5  # a tie counts half
    assert np.isnan(auroc(scores, np.zeros(5, dtype=bool)))


def test_out_of_scope_metrics() -> None:
    probs = np.array([[0.95, 0.05], [0.1, 0.9], [0.55, 0.45], [0.6, 0.4]])
    true, pred = ["a", "b", "oos", "oos"], ["a", "b", "oos", "a"]
    metrics = oos_metrics(true, probs.max(axis=1), pred, "oos")
    assert metrics["oos_recall"] == 0.5 and metrics["in_scope_accuracy"] == 1.0
    assert metrics["oos_precision"] == 1.0 and metrics["oos_rows"] == 2
    assert metrics["oos_auroc"] == 1.0  # both out-of-scope rows are the least confident


def test_confusions_and_report_files(tmp_path: Path) -> None:
    true, pred = ["a", "a", "b", "b"], ["a", "b", "b", "a"]
    assert most_confused(["a", "a", "a", "b"], ["b", "b", "c", "b"])[0] == ("a", "b", 2)
    metrics = {
        **classification_metrics(true, pred, ["a", "b"]),
        "rows": 4,
        "data": "x.csv",
        "threshold": 0.0,
        "below_threshold": 0.0,
        "predictions": pred,
        "speed": {"throughput_per_s": 100.0, "latency_ms_p50": 1.0, "latency_ms_p95": 2.0, "batch_size": 8},
    }
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.7, 0.3]])
    score, correct, in_scope = probs.max(axis=1), np.array([1, 0, 1, 0], bool), np.zeros(4, bool)
    metrics |= {
        "calibration": {
            "temperature": 1.3,
            "ece": 0.1,
            "ece_uncalibrated": 0.2,
            **reliability(probs, [0, 0, 1, 1]),
        },
        "operating_point": {
            **CalibrationConfig().model_dump(),
            **operating_point(score, correct, in_scope, 0.65).to_dict(),
            "achieved": None,
        },
        "handoff_curve": handoff_curve(score, correct, in_scope),
    }
    write_evaluation(metrics, Dataset(["t1", "t2", "t3", "t4"], true), ["a", "b"], tmp_path, "title")
    for plot in ("confusion.png", "reliability.png", "handoff.png"):
        assert (tmp_path / plot).stat().st_size > 1000
    report = (tmp_path / "report.md").read_text()
    assert "| accuracy | 50.00% |" in report
    # Threshold 0.65 hands off the rows at 0.6; the other wrong one (0.7) is routed.
    assert "25.0% of in-scope messages handed off" in report and "routed messages 66.7% right" in report
    assert '"macro_f1"' in (tmp_path / "metrics.json").read_text()
