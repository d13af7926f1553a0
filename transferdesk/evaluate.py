"""Scoring a classifier: accuracy, macro-F1, per-intent P/R/F1, out-of-scope detection, speed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score

from transferdesk.data import Dataset
from transferdesk.modeling import IntentModel

# Single-request latency is sampled on this many utterances: enough for a stable p95.
LATENCY_SAMPLES = 50
# An evaluation's files (a registry version's test/ holds these too, written by this module).
REPORT_FILES = {"metrics": "metrics.json", "report": "report.md", "confusion": "confusion.png"}


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
    probs = model.predict_proba(ds.texts, batch_size, progress)
    predict_seconds = time.perf_counter() - start
    # Scored as the data allows: with out-of-scope rows the threshold is part of the task
    # (a message below it counts as predicted out-of-scope); without them, plain argmax.
    oos_label = model.oos_label
    has_oos = oos_label in ds.labels
    pred = model.decide(probs, out_of_scope=has_oos)
    labels = scored_labels(model, has_oos)
    metrics = classification_metrics(ds.labels, pred, labels)
    metrics.update(
        rows=len(ds),
        data=ds.path,
        threshold=model.threshold,
        below_threshold=float(np.mean(model.out_of_scope(probs))),
    )
    if has_oos:
        metrics.update(oos_metrics(ds.labels, probs, pred, oos_label))
    metrics["speed"] = measure_speed(model, ds.texts, batch_size)
    metrics["speed"]["predict_seconds"] = predict_seconds
    metrics["predictions"] = pred
    return metrics


def scored_labels(model: IntentModel, has_oos: bool) -> list[str]:
    """The model's intents, and its out-of-scope label where the data has such rows."""
    return model.labels + ([model.oos_label] if has_oos else [])


def plot_confusion(y_true: list[str], y_pred: list[str], labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = confusion_matrix(y_true, y_pred, labels=labels)
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


def write_evaluation(
    metrics: dict, ds: Dataset, labels: list[str], out_dir: Path, title: str
) -> dict[str, Path]:
    """metrics.json, report.md and confusion.png in out_dir; returns their paths by kind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {kind: out_dir / name for kind, name in REPORT_FILES.items()}
    plot_confusion(ds.labels, metrics["predictions"], labels, written["confusion"])
    written["report"].write_text(report_markdown(metrics, ds.labels, title), encoding="utf-8")
    saved = {k: v for k, v in metrics.items() if k != "predictions"}
    written["metrics"].write_text(json.dumps(saved, indent=2), encoding="utf-8")
    return written
