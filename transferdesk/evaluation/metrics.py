"""Scoring a classifier: accuracy, macro-F1, per-intent P/R/F1, out-of-scope detection, speed;
and each other task's head (accuracy, macro-F1, per-class P/R/F1, confusion) where the data
has its labels.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score

from transferdesk.data import Dataset
from transferdesk.model.confidence import handoff_curve, operating_point, reliability
from transferdesk.model.modeling import Heads, IntentModel

log = logging.getLogger(__name__)


# Single-request latency is sampled on this many utterances: enough for a stable p95.
LATENCY_SAMPLES = 50


def classification_metrics(y_true: list[str], y_pred: list[str], labels: list[str]) -> dict:
    """Accuracy, macro-F1 and per-intent P/R/F1 over the intents that occur in the data or
    the predictions (an intent neither seen nor predicted says nothing about the model)."""
    scored = [lab for lab in labels if lab in set(y_true) | set(y_pred)]
    if not y_true or not scored:
        return {"accuracy": 0.0, "macro_f1": 0.0, "per_intent": {}}
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=scored, zero_division=0.0
    )
    table = {
        label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
        for label, p, r, f, n in zip(scored, precision, recall, f1, support, strict=True)
    }
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(np.mean(f1)),
        "per_intent": table,
    }


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC of `scores` for telling `positive` rows apart; NaN with only one class."""
    if positive.all() or not positive.any():
        return float("nan")
    return float(roc_auc_score(positive, scores))


def oos_metrics(y_true: list[str], score: np.ndarray, pred: list[str], oos_label: str) -> dict:
    """`score`: the model's out-of-scope score of each row (higher: more in-scope)."""
    true, pred_a = np.array(y_true), np.array(pred)
    is_oos = true == oos_label
    flagged = pred_a == oos_label
    return {
        "in_scope_accuracy": float(np.mean(pred_a[~is_oos] == true[~is_oos])),
        "oos_recall": float(np.mean(flagged[is_oos])),
        "oos_precision": float(np.mean(is_oos[flagged])) if flagged.any() else 0.0,
        "oos_auroc": auroc(-score, is_oos),
        "oos_rows": int(is_oos.sum()),
    }


def confidence_metrics(model: IntentModel, logits: np.ndarray, heads: Heads, y_true: list[str]) -> dict:
    """Calibration (ECE of the top intent on in-scope rows, as served and at temperature 1, with
    the reliability table), the operating point of the model's threshold (its target's value
    achieved here), and the curve of hand-off rate against routed accuracy and out-of-scope
    recall, for choosing another."""
    known, targets = model.intent_targets(y_true)
    correct = known & (heads.intent.argmax(axis=1) == targets)
    is_oos = np.array([label == model.oos_label for label in y_true], dtype=bool)
    point = operating_point(heads.score, correct, is_oos, model.threshold)
    table = reliability(heads.intent[known], targets[known])
    return {
        "calibration": {
            "temperature": model.temperature,
            "ece": table["ece"],
            "ece_uncalibrated": model.calibration_error(logits, y_true, temperature=1.0),
            "bins": table["bins"],
        },
        "operating_point": {
            **model.calibration.model_dump(mode="json"),
            **point.to_dict(),
            "achieved": point.value(model.calibration.target),
        },
        "handoff_curve": handoff_curve(heads.score, correct, is_oos),
    }


def measure_speed(model: IntentModel, texts: list[str], batch_size: int) -> dict:
    """Batched throughput over all texts and single-request latency on a sample."""
    start = time.perf_counter()
    model.predict_proba(texts, batch_size)
    seconds = time.perf_counter() - start
    latencies = []
    for text in texts[:LATENCY_SAMPLES]:
        t0 = time.perf_counter()
        model.predict_proba([text])
        latencies.append((time.perf_counter() - t0) * 1000)
    return {
        "throughput_per_s": len(texts) / seconds if seconds else float("inf"),
        "latency_ms_p50": float(np.percentile(latencies, 50)),
        "latency_ms_p95": float(np.percentile(latencies, 95)),
        "batch_size": batch_size,
    }


def evaluate(model: IntentModel, ds: Dataset, batch_size: int = 64, progress: bool = True) -> dict:
    """All metrics for one labelled file; out-of-scope metrics when it has rows labelled with
    the model's out-of-scope label."""
    start = time.perf_counter()
    logits = model.predict_logits(ds.texts, batch_size, progress)
    heads = model.split_heads(logits)
    predict_seconds = time.perf_counter() - start
    # Scored as the data allows: with out-of-scope rows the threshold is part of the task
    # (a message below it counts as predicted out-of-scope); without them, plain argmax.
    oos_label = model.oos_label
    has_oos = oos_label in ds.labels
    pred = model.decide(heads, out_of_scope=has_oos)
    labels = scored_labels(model, has_oos)
    metrics = classification_metrics(ds.labels, pred, labels)
    metrics.update(
        rows=len(ds),
        data=ds.path,
        threshold=model.threshold,
        below_threshold=float(np.mean(model.out_of_scope(heads.score))),
    )
    if has_oos:
        metrics.update(oos_metrics(ds.labels, heads.score, pred, oos_label))
    metrics.update(confidence_metrics(model, logits, heads, ds.labels))
    if tasks := task_metrics(model, ds, heads.tasks):
        metrics["tasks"] = tasks
    metrics["speed"] = measure_speed(model, ds.texts, batch_size)
    metrics["speed"]["predict_seconds"] = predict_seconds
    metrics["predictions"] = pred
    return metrics


def task_metrics(model: IntentModel, ds: Dataset, task_probs: dict[str, np.ndarray]) -> dict:
    """Each other task's scores over the rows the data labels for it (`predictions`: the
    head's answer on each of those rows, in order)."""
    out = {}
    for task, probs in task_probs.items():
        truth = ds.tasks.get(task, [])
        rows = [i for i, label in enumerate(truth) if label is not None]
        if not rows:
            continue
        names = model.tasks[task]
        pred = [names[j] for j in probs[rows].argmax(axis=1)]
        scores = classification_metrics([truth[i] for i in rows], pred, names)
        out[task] = {**scores, "rows": len(rows), "predictions": pred}
    return out


def scores_alone(metrics: dict) -> dict:
    """An evaluation's figures without its per-row predictions (the intent's and each task's)."""
    saved = {k: v for k, v in metrics.items() if k != "predictions"}
    if "tasks" in saved:
        saved["tasks"] = {
            t: {k: v for k, v in m.items() if k != "predictions"} for t, m in saved["tasks"].items()
        }
    return saved


def scored_labels(model: IntentModel, has_oos: bool) -> list[str]:
    """The model's intents, and its out-of-scope label where the data has such rows."""
    return model.labels + ([model.oos_label] if has_oos else [])
