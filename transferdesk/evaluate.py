"""Scoring a classifier: accuracy, macro-F1, per-intent P/R/F1, out-of-scope detection, speed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from transferdesk.data import Dataset
from transferdesk.model import TrainedModel

# Single-request latency is sampled on this many utterances: enough for a stable p95.
LATENCY_SAMPLES = 50


def per_intent(y_true: list[str], y_pred: list[str], labels: list[str]) -> dict[str, dict]:
    out = {}
    true, pred = np.array(y_true), np.array(y_pred)
    for label in labels:
        tp = int(np.sum((pred == label) & (true == label)))
        predicted, support = int(np.sum(pred == label)), int(np.sum(true == label))
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return out


def classification_metrics(y_true: list[str], y_pred: list[str], labels: list[str]) -> dict:
    """Accuracy and macro-F1 over the intents that occur in the data or the predictions."""
    scored = [lab for lab in labels if lab in set(y_true) | set(y_pred)]
    table = per_intent(y_true, y_pred, scored)
    accuracy = float(np.mean(np.array(y_true) == np.array(y_pred))) if y_true else 0.0
    macro_f1 = float(np.mean([m["f1"] for m in table.values()])) if table else 0.0
    return {"accuracy": accuracy, "macro_f1": macro_f1, "per_intent": table}


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve via the rank-sum (Mann-Whitney U) identity; ties averaged."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def apply_threshold(probs: np.ndarray, labels: list[str], threshold: float, oos_label: str) -> list[str]:
    best = probs.argmax(axis=1)
    return [oos_label if probs[i, j] < threshold else labels[j] for i, j in enumerate(best)]


def _oos_balance(y_true: list[str], pred: list[str], oos_label: str) -> float:
    true = np.array(y_true)
    pred_a = np.array(pred)
    is_oos = true == oos_label
    in_scope_acc = np.mean(pred_a[~is_oos] == true[~is_oos]) if (~is_oos).any() else 0.0
    oos_recall = np.mean(pred_a[is_oos] == oos_label) if is_oos.any() else 0.0
    return float((in_scope_acc + oos_recall) / 2)


def choose_threshold(y_true: list[str], probs: np.ndarray, labels: list[str], oos_label: str) -> float:
    """Confidence below which a message is out-of-scope, picked on validation data.

    With out-of-scope validation rows: the threshold that best balances in-scope accuracy
    and out-of-scope recall. Without: the 5th percentile of in-scope confidence, so about
    one in twenty in-scope messages would go to a human — a conservative default.
    """
    confidence = probs.max(axis=1)
    if oos_label not in y_true:
        return float(np.quantile(confidence, 0.05)) if len(confidence) else 0.0
    candidates = np.unique(np.concatenate([[0.0], confidence]))
    scores = [
        _oos_balance(y_true, apply_threshold(probs, labels, t, oos_label), oos_label) for t in candidates
    ]
    return float(candidates[int(np.argmax(scores))])


def oos_metrics(y_true: list[str], probs: np.ndarray, pred: list[str], oos_label: str) -> dict:
    true, pred_a = np.array(y_true), np.array(pred)
    is_oos = true == oos_label
    flagged = pred_a == oos_label
    return {
        "in_scope_accuracy": float(np.mean(pred_a[~is_oos] == true[~is_oos])),
        "oos_recall": float(np.mean(flagged[is_oos])),
        "oos_precision": float(np.mean(is_oos[flagged])) if flagged.any() else 0.0,
        "oos_auroc": auroc(-probs.max(axis=1), is_oos),
        "oos_rows": int(is_oos.sum()),
    }


def measure_speed(model: TrainedModel, texts: list[str], batch_size: int) -> dict:
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


def evaluate(
    model: TrainedModel, ds: Dataset, oos_label: str, batch_size: int = 64, progress: bool = True
) -> dict:
    """All metrics for one labelled file; out-of-scope metrics when it has `oos_label` rows."""
    start = time.perf_counter()
    probs = model.predict_proba(ds.texts, batch_size, progress)
    predict_seconds = time.perf_counter() - start
    # Scored as the data allows: with out-of-scope rows the threshold is part of the task
    # (a message below it counts as predicted out-of-scope); without them, plain argmax.
    has_oos = oos_label in ds.labels
    pred = apply_threshold(probs, model.labels, model.threshold if has_oos else 0.0, oos_label)
    labels = model.labels + ([oos_label] if has_oos else [])
    metrics = classification_metrics(ds.labels, pred, labels)
    metrics.update(
        rows=len(ds),
        data=ds.path,
        threshold=model.threshold,
        below_threshold=float(np.mean(probs.max(axis=1) < model.threshold)),
    )
    if has_oos:
        metrics.update(oos_metrics(ds.labels, probs, pred, oos_label))
    metrics["speed"] = measure_speed(model, ds.texts, batch_size)
    metrics["speed"]["predict_seconds"] = predict_seconds
    metrics["predictions"] = pred
    return metrics


def confusion_matrix(y_true: list[str], y_pred: list[str], labels: list[str]) -> np.ndarray:
    index = {lab: i for i, lab in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), dtype=int)
    for t, p in zip(y_true, y_pred, strict=True):
        if t in index and p in index:
            matrix[index[t], index[p]] += 1
    return matrix


def plot_confusion(y_true: list[str], y_pred: list[str], labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = confusion_matrix(y_true, y_pred, labels)
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
    size = max(6.0, 0.28 * len(labels) + 3)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("predicted intent")
    ax.set_ylabel("true intent")
    ax.set_title("Confusion matrix (share of each true intent)")
    if len(labels) <= 30:
        for i, j in zip(*np.nonzero(matrix), strict=True):
            ax.text(
                j,
                i,
                matrix[i, j],
                ha="center",
                va="center",
                fontsize=6,
                color="white" if share[i, j] > 0.5 else "black",
            )
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def most_confused(y_true: list[str], y_pred: list[str], n: int = 5) -> list[tuple[str, str, int]]:
    pairs: dict[tuple[str, str], int] = {}
    for t, p in zip(y_true, y_pred, strict=True):
        if t != p:
            pairs[(t, p)] = pairs.get((t, p), 0) + 1
    ranked = sorted(pairs.items(), key=lambda kv: -kv[1])[:n]
    return [(t, p, c) for (t, p), c in ranked]


def report_markdown(metrics: dict, y_true: list[str], title: str) -> str:
    lines = [
        f"# {title}",
        "",
        f"Data: `{metrics['data']}` ({metrics['rows']} rows)",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| accuracy | {metrics['accuracy']:.2%} |",
        f"| macro-F1 | {metrics['macro_f1']:.2%} |",
    ]
    if "oos_recall" in metrics:
        lines += [
            f"| in-scope accuracy | {metrics['in_scope_accuracy']:.2%} |",
            f"| out-of-scope recall | {metrics['oos_recall']:.2%} |",
            f"| out-of-scope AUROC | {metrics['oos_auroc']:.3f} |",
            f"| confidence threshold | {metrics['threshold']:.3f} |",
        ]
    speed = metrics["speed"]
    lines += [
        f"| below the confidence threshold (to a human) | {metrics['below_threshold']:.1%} |",
        f"| throughput | {speed['throughput_per_s']:.0f} utterances/s (batch {speed['batch_size']}) |",
        f"| latency p50 / p95 | {speed['latency_ms_p50']:.1f} / {speed['latency_ms_p95']:.1f} ms |",
        "",
        "## Weakest intents (F1)",
        "",
    ]
    worst = sorted(metrics["per_intent"].items(), key=lambda kv: kv[1]["f1"])[:5]
    lines += [
        f"- {name}: F1 {m['f1']:.2f} (P {m['precision']:.2f}, R {m['recall']:.2f}, n={m['support']})"
        for name, m in worst
    ]
    lines += ["", "## Most confused (true → predicted)", ""]
    lines += [f"- {t} → {p}: {c}" for t, p, c in most_confused(y_true, metrics["predictions"])]
    return "\n".join(lines) + "\n"


def write_evaluation(metrics: dict, ds: Dataset, labels: list[str], out_dir: Path, title: str) -> None:
    """metrics.json, report.md and confusion.png in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_confusion(ds.labels, metrics["predictions"], labels, out_dir / "confusion.png")
    (out_dir / "report.md").write_text(report_markdown(metrics, ds.labels, title), encoding="utf-8")
    saved = {k: v for k, v in metrics.items() if k != "predictions"}
    (out_dir / "metrics.json").write_text(json.dumps(saved, indent=2), encoding="utf-8")
