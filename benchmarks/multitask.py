"""Transfer modes on BANKING77 10-shot with CLINC150 as the source task: none, a sequential
source stage (source first, then target), and joint multi-task training (the source task as
a second head, trained beside the target), each over several seeds.

    python benchmarks/multitask.py                       # 3 modes × seeds 1 2 3 (about 80 min on 2 cores)
    python benchmarks/multitask.py --modes none joint --seeds 1

Target train_10.csv, validation valid.csv, test test.csv (scored once per model); source
clinc150/train.csv (15,000 rows, 150 intents). Reads ../shared/data (--data-dir). Each run is
a process of its own; results/multitask.{json,md} are rewritten after every run, so an
interrupted benchmark keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

from figures import child_result, mean_sd

HERE = Path(__file__).resolve().parent
MODES = {
    "none": {},
    # One pass over the source: more passes specialise the encoder to CLINC150's intents.
    "sequential": {"source_training.mode": "sequential", "source_training.epochs": 1},
    "joint": {"source_training.mode": "joint"},
}


def run_one(mode: str, seed: int, data: Path, work: Path) -> dict:
    from transferdesk.config import load_config
    from transferdesk.training.train import train_and_register

    overrides = {
        "data.train": str(data / "banking77/train_10.csv"),
        "data.valid": str(data / "banking77/valid.csv"),
        "data.test": str(data / "banking77/test.csv"),
        **({"data.source": str(data / "clinc150/train.csv")} if mode != "none" else {}),
        **MODES[mode],
        "output": str(work / "registry"),
        "name": f"banking77-{mode}",
        "runtime.seed": seed,
        "runtime.progress": False,
    }
    start = time.perf_counter()
    version = train_and_register(load_config(None, overrides))
    metrics = version.metrics
    return {
        "mode": mode,
        "seed": seed,
        "test_accuracy": metrics["accuracy"],
        "test_macro_f1": metrics["macro_f1"],
        "source_seconds": metrics.get("source_seconds", 0.0),
        "train_seconds": metrics["train_seconds"],
        "wall_seconds": time.perf_counter() - start,
        "best_epoch": metrics["best_epoch"],
        "epochs_run": len(metrics["valid_history"]),
        "source_valid_accuracy": metrics["valid_history"][metrics["best_epoch"] - 1].get("source_accuracy"),
        "model": str(version.path),
    }


def summary(runs: list[dict]) -> list[dict]:
    rows = []
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        if not mine:
            continue
        acc = [r["test_accuracy"] for r in mine]
        seconds = [r["source_seconds"] + r["train_seconds"] for r in mine]
        rows.append(
            {
                "mode": mode,
                "seeds": sorted(r["seed"] for r in mine),
                "accuracies": acc,
                "accuracy_mean": statistics.mean(acc),
                "accuracy_sd": statistics.pstdev(acc),
                "accuracy_min": min(acc),
                "accuracy_max": max(acc),
                "macro_f1_mean": statistics.mean(r["test_macro_f1"] for r in mine),
                "seconds_mean": statistics.mean(seconds),
            }
        )
    return rows


def markdown(runs: list[dict], machine: str) -> str:
    lines = [
        f"Measured on {machine}. Target: banking77/train_10.csv (770 rows, 77 intents); source: "
        "clinc150/train.csv (15,000 rows, 150 intents); test: banking77/test.csv (3,080 rows).",
        "",
        "| transfer | seeds | test accuracy, mean ± sd | min – max | macro-F1 | training time "
        "(source + target) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in summary(runs):
        lines.append(
            f"| {row['mode']} | {', '.join(map(str, row['seeds']))} | {mean_sd(row['accuracies'])} | "
            f"{row['accuracy_min']:.2%} – {row['accuracy_max']:.2%} | "
            f"{row['macro_f1_mean']:.2%} | {row['seconds_mean']:.0f} s |"
        )
    lines += [
        "",
        "| run | seed | test accuracy | source | target | best epoch / run |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        lines.append(
            f"| {r['mode']} | {r['seed']} | {r['test_accuracy']:.2%} | {r['source_seconds']:.0f} s | "
            f"{r['train_seconds']:.0f} s | {r['best_epoch']} / {r['epochs_run']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=HERE.parent.parent / "shared" / "data")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument(
        "--work", type=Path, default=HERE / "work" / "multitask", help="registry for the runs"
    )
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process: one run, JSON out
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.seeds[0], args.data_dir, args.work)))
        return
    if not (args.data_dir / "clinc150" / "train.csv").is_file():
        sys.exit(f"error: BANKING77 and CLINC150 not found under {args.data_dir}; pass --data-dir")
    import torch

    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, CPU"
    out = args.results / "multitask.json"
    runs = json.loads(out.read_text())["runs"] if out.is_file() else []
    for seed in args.seeds:  # seed by seed: an interrupted benchmark has every mode of the seeds it did
        for mode in args.modes:
            print(f"== {mode}, seed {seed}", flush=True)
            command = [sys.executable, __file__, "--one", mode, "--seeds", str(seed)]
            command += ["--data-dir", str(args.data_dir), "--work", str(args.work)]
            result = child_result(command)
            runs = [r for r in runs if (r["mode"], r["seed"]) != (mode, seed)] + [result]
            print(json.dumps(result, indent=2), flush=True)
            args.results.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"machine": machine, "runs": runs, "summary": summary(runs)}, indent=2))
            (args.results / "multitask.md").write_text(markdown(runs, machine))
    print((args.results / "multitask.md").read_text())


if __name__ == "__main__":
    main()
