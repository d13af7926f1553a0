"""What a search leaves behind: the trial table (CSV, Markdown) and a plot of the
validation metric per epoch of every trial."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

from ray.tune import ResultGrid

from transferdesk.registry import portable_path
from tuning.config import SEARCHABLE
from tuning.schedule import is_baseline


def trial_rows(results: ResultGrid, metric: str, baselines: Sequence[dict] = ()) -> list[dict]:
    """One row per trial, best first; `baseline` marks trials of the untuned recipe."""
    rows = []
    for result in results:
        frame = result.metrics_dataframe
        reported = frame is not None and not frame.empty and metric in frame
        params = result.config or {}
        epochs_run = int(frame["epoch"].max()) if reported else 0
        rows.append(
            {
                "trial": (result.metrics or {}).get("trial_id", "?"),
                "candidate": params.get("candidate"),
                **{name: params.get(name) for name in SEARCHABLE},
                # A model directory by its name: the table is kept in the registry.
                "teacher_backbone": portable_path(params.get("teacher_backbone")),
                f"best_{metric}": float(frame[metric].max()) if reported else math.nan,
                "epochs_run": epochs_run,
                "wall_s": round(float(frame["time_total_s"].iloc[-1]), 1) if reported else math.nan,
                "stopped_early": epochs_run < int(params.get("epochs", 0)),
                "baseline": is_baseline(params, baselines),
                "status": "error" if result.error else "ok",
            }
        )
    return sorted(rows, key=lambda r: -r[f"best_{metric}"] if not math.isnan(r[f"best_{metric}"]) else 1)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 0.01 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def write_table(rows: list[dict], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_fmt(r[h]) for h in header) + " |" for r in rows]
    (out_dir / "trials.md").write_text("\n".join(lines) + "\n")


def plot_curves(results: ResultGrid, metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors: dict[str, str] = {}
    for result in results:
        frame = result.metrics_dataframe
        if frame is None or frame.empty or metric not in frame:
            continue
        candidate = (result.config or {}).get("candidate", "?")
        first = candidate not in colors
        color = colors.setdefault(candidate, f"C{len(colors) % 10}")
        ax.plot(
            frame["epoch"],
            frame[metric],
            marker="o",
            ms=3,
            color=color,
            alpha=0.8,
            label=candidate if first else None,
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title("Trials (colour: source-model candidate; short lines: stopped early)")
    ax.grid(alpha=0.3)
    ax.legend(title="candidate")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
