"""An evaluation's report: metrics.json, report.md, and confusion, reliability and hand-off plots."""

from __future__ import annotations

import contextlib
import json
import logging
from functools import cache
from pathlib import Path
from types import ModuleType

import numpy as np
from sklearn.metrics import confusion_matrix

from transferdesk.data import Dataset
from transferdesk.evaluation.metrics import scores_alone

log = logging.getLogger(__name__)


# An evaluation's files (a registry version's test/ holds these too, written by this module).
REPORT_FILES = {
    "metrics": "metrics.json",
    "report": "report.md",
    "confusion": "confusion.png",
    "reliability": "reliability.png",
    "handoff": "handoff.png",
}


def _pyplot() -> ModuleType:
    """matplotlib's pyplot on the file-only backend (no display on servers and CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(
    y_true: list[str], y_pred: list[str], labels: list[str], path: Path, what: str = "intent"
) -> None:
    plt = _pyplot()

    font, ticks = label_font(labels), labels
    if font is False:  # no installed font draws them: numbered, the numbers explained below
        ticks = [str(i) for i in range(1, len(labels) + 1)]
    matrix = confusion_matrix(y_true, y_pred, labels=labels)
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
    size = max(6.0, 0.28 * len(labels) + 3)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    family = {"fontfamily": font} if isinstance(font, str) else {}
    ax.set_xticks(range(len(labels)), ticks, rotation=90, fontsize=7, **family)
    ax.set_yticks(range(len(labels)), ticks, fontsize=7, **family)
    ax.set_xlabel(f"predicted {what}")
    ax.set_ylabel(f"true {what}")
    ax.set_title(f"Confusion matrix (share of each true {what})")
    if font is False:
        key = "; ".join(f"{i} = {label}" for i, label in enumerate(labels, start=1))
        # The key as text would miss its glyphs too: its code points are at least legible.
        fig.text(0.01, 0.005, key.encode("ascii", "backslashreplace").decode()[:400], fontsize=5, wrap=True)
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


@cache
def _font_chars(path: str) -> frozenset[int]:
    from matplotlib.ft2font import FT2Font

    return frozenset(FT2Font(path).get_charmap())


def label_font(labels: list[str]) -> str | bool | None:
    """A font that draws every character of `labels`: None when matplotlib's default does (any
    Latin label), else the name of an installed one (CJK labels need a CJK font), or False
    when none does, and the plot numbers its labels instead."""
    from matplotlib import font_manager

    needed = {ord(c) for label in labels for c in label}
    default = font_manager.findfont(font_manager.FontProperties())
    if needed <= _font_chars(default):
        return None
    for entry in font_manager.fontManager.ttflist:
        with contextlib.suppress(RuntimeError, OSError):
            if needed <= _font_chars(entry.fname):
                return entry.name
    log.warning(
        "no installed font draws the labels %s; the plot numbers them (install one, e.g. Debian's "
        "fonts-noto-cjk for Chinese)",
        ", ".join(labels[:5]),
    )
    return False


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
    lines += _confidence_markdown(metrics)
    lines += ["", "## Most confused (true → predicted)", ""]
    lines += [f"- {t} → {p}: {c}" for t, p, c in most_confused(y_true, metrics["predictions"])]
    if tasks := metrics.get("tasks"):
        lines += ["", "## Other tasks", "", "| task | rows | accuracy | macro-F1 | weakest class (F1) |"]
        lines.append("| --- | --- | --- | --- | --- |")
        for task, m in tasks.items():
            name, worst = min(m["per_intent"].items(), key=lambda kv: kv[1]["f1"])
            scores = f"{m['rows']} | {m['accuracy']:.2%} | {m['macro_f1']:.2%}"
            lines.append(f"| {task} | {scores} | {name} ({worst['f1']:.2f}) |")
    return "\n".join(lines) + "\n"


def _confidence_markdown(metrics: dict) -> list[str]:
    calibration, point = metrics["calibration"], metrics["operating_point"]
    target = point["target"] + ("" if point["value"] is None else f" {point['value']}")
    oos = "—" if point["oos_recall"] is None else f"{point['oos_recall']:.1%}"
    lines = [
        "",
        "## Confidence",
        "",
        f"- Calibration: temperature {calibration['temperature']:.2f}; expected calibration error "
        f"{calibration['ece']:.3f} (uncalibrated {calibration['ece_uncalibrated']:.3f}); `reliability.png`.",
        f"- Threshold {point['threshold']:.3f} on the {point['score']} score, chosen on validation data for "
        f"target `{target}`. Here: {point['handoff_rate']:.1%} of in-scope messages handed off "
        f"({point['handoff_all']:.1%} of all), routed messages {point['precision']:.1%} right, "
        f"out-of-scope recall {oos}.",
        "",
        "### Hand-off curve (`handoff.png`): pick an operating point",
        "",
        "| in-scope handed off | all handed off | routed right | out-of-scope recall | threshold |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in metrics["handoff_curve"][::2]:
        recall = "—" if row["oos_recall"] is None else f"{row['oos_recall']:.1%}"
        lines.append(
            f"| {row['handoff_rate']:.1%} | {row['handoff_all']:.1%} | {row['precision']:.1%} | "
            f"{recall} | {row['threshold']:.3f} |"
        )
    return lines


def plot_reliability(calibration: dict, path: Path) -> None:
    plt = _pyplot()

    bins = calibration["bins"]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfectly calibrated")
    width = [b["high"] - b["low"] for b in bins]
    ax.bar(
        [b["low"] for b in bins],
        [b["accuracy"] for b in bins],
        width=width,
        align="edge",
        edgecolor="black",
        alpha=0.7,
        label="accuracy in the bin (in-scope rows)",
    )
    ax.plot(
        [b["confidence"] for b in bins],
        [b["accuracy"] for b in bins],
        "o",
        color="C3",
        label="each bin at its mean confidence",
    )
    ax.set_xlabel("confidence of the top intent")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(
        f"Reliability (T = {calibration['temperature']:.2f}): ECE {calibration['ece']:.3f}, "
        f"uncalibrated {calibration['ece_uncalibrated']:.3f}",
        fontsize=9,
    )
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_handoff(curve: list[dict], point: dict, path: Path) -> None:
    plt = _pyplot()

    rate = [100 * row["handoff_rate"] for row in curve]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot(rate, [100 * row["precision"] for row in curve], "-o", ms=3, label="routed messages right")
    if curve[0]["oos_recall"] is not None:
        ax.plot(rate, [100 * row["oos_recall"] for row in curve], "-s", ms=3, label="out-of-scope recall")
    ax.axvline(100 * point["handoff_rate"], color="grey", ls="--", label="the model's threshold")
    ax.set_xlabel("in-scope messages handed off to a human (%)")
    ax.set_ylabel("%")
    ax.set_title("Hand-off rate against routed accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_evaluation(
    metrics: dict, ds: Dataset, labels: list[str], out_dir: Path, title: str
) -> dict[str, Path]:
    """metrics.json, report.md and the plots (REPORT_FILES) in out_dir; returns their paths by kind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {kind: out_dir / name for kind, name in REPORT_FILES.items()}
    plot_confusion(ds.labels, metrics["predictions"], labels, written["confusion"])
    plot_reliability(metrics["calibration"], written["reliability"])
    plot_handoff(metrics["handoff_curve"], metrics["operating_point"], written["handoff"])
    for task, scores in metrics.get("tasks", {}).items():
        written[f"confusion_{task}"] = out_dir / f"confusion_{task}.png"
        names = list(scores["per_intent"])
        path = written[f"confusion_{task}"]
        plot_confusion(ds.task(task).labels, scores["predictions"], names, path, task)
    written["report"].write_text(report_markdown(metrics, ds.labels, title), encoding="utf-8")
    written["metrics"].write_text(
        json.dumps(scores_alone(metrics), indent=2, ensure_ascii=False), encoding="utf-8"
    )
    return written
