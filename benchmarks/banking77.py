"""BANKING77 benchmark of the default recipe: few-shot, full data, and with a source stage.

    python benchmarks/banking77.py                      # all three runs (about 30 min on 2 cores)
    python benchmarks/banking77.py --runs few_shot      # just the 10-shot run
    python benchmarks/banking77.py --runs few_shot --seeds 13 1 2 3   # and its seed spread

Reads ../shared/data (override with --data-dir), writes results/banking77.{json,md}.
Each run is a separate process so its peak memory is its own.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from figures import child_result

HERE = Path(__file__).resolve().parent
# Published 10-shot BANKING77 test accuracies (Zhang et al. 2021, DNNC/CPFT tables).
PUBLISHED = {
    "few_shot": "RoBERTa-base 84.27%, BERT-large 83.42%",
    "full": "BERT-large 93.66%",
    "transfer": "CPFT (125M, contrastive pre-training) 87.20%",
}


def runs(data: Path) -> dict[str, dict]:
    target = {"data.valid": str(data / "banking77/valid.csv"), "data.test": str(data / "banking77/test.csv")}
    return {
        "few_shot": {"data.train": str(data / "banking77/train_10.csv"), **target},
        # 8,622 rows: 3 epochs already pass the point where validation stops improving.
        "full": {"data.train": str(data / "banking77/train.csv"), **target, "training.epochs": 3},
        "transfer": {
            "data.train": str(data / "banking77/train_10.csv"),
            **target,
            "data.source": str(data / "clinc150/train.csv"),
            "source_training.epochs": 1,
        },
    }


DEFAULT_SEED = 13  # RuntimeConfig's; results under this seed keep the run's plain name


def run_key(name: str, seed: int) -> str:
    return name if seed == DEFAULT_SEED else f"{name}@seed{seed}"


def run_one(name: str, seed: int, data: Path, work: Path) -> dict:
    from transferdesk.config import load_config
    from transferdesk.training.train import train_and_register

    overrides = {
        **runs(data)[name],
        "output": str(work / "registry"),
        "name": f"banking77-{name}",
        "runtime.seed": seed,
    }
    cfg = load_config(None, overrides)
    start = time.perf_counter()
    version = train_and_register(cfg)
    wall = time.perf_counter() - start
    metrics = version.metrics
    return {
        "run": run_key(name, seed),
        "seed": seed,
        "overrides": {k: v for k, v in overrides.items() if not k.startswith("data.")},
        "train_file": Path(cfg.data.train).name,
        "source_file": cfg.data.source and Path(cfg.data.source).name,
        "test_accuracy": metrics["accuracy"],
        "test_macro_f1": metrics["macro_f1"],
        "train_seconds": metrics["train_seconds"],
        "source_seconds": metrics.get("source_seconds"),
        "best_epoch": metrics["best_epoch"],
        "epochs_run": len(metrics["valid_history"]),
        "wall_seconds": wall,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "predict_per_s": metrics["test"]["speed"]["throughput_per_s"],
        "latency_ms_p50": metrics["test"]["speed"]["latency_ms_p50"],
        "model": str(version.path),
        "published": PUBLISHED[name],
    }


def markdown(results: list[dict], machine: str) -> str:
    lines = [
        f"Measured on {machine}.",
        "",
        "| run | train file | source stage | test accuracy | macro-F1 | training time | "
        "peak memory | published |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        source = f"{r['source_file']} ({r['source_seconds']:.0f} s)" if r["source_file"] else "none"
        r = {
            **r,
            "run": f"{r['run']} (seed {r.get('seed', DEFAULT_SEED)})" if "@" not in r["run"] else r["run"],
        }
        lines.append(
            f"| {r['run']} | {r['train_file']} | {source} | {r['test_accuracy']:.2%} | "
            f"{r['test_macro_f1']:.2%} | {r['train_seconds']:.0f} s ({r['epochs_run']} epochs) | "
            f"{r['peak_rss_gib']:.2f} GiB | {r['published']} |"
        )
    lines += spread(results)
    return "\n".join(lines) + "\n"


def spread(results: list[dict]) -> list[str]:
    """Mean and spread of each run over the seeds other than the default (seeds 1-3 and so on):
    single runs differ by up to a point from the seed alone."""
    by_run: dict[str, list[dict]] = {}
    for r in results:
        if r.get("seed", DEFAULT_SEED) != DEFAULT_SEED:
            by_run.setdefault(r["run"].split("@")[0], []).append(r)
    if not by_run:
        return []
    lines = [
        "",
        "Seed spread (the same run with other seeds):",
        "",
        "| run | seeds | test accuracy, mean ± sd | min – max |",
        "| --- | --- | --- | --- |",
    ]
    for name, rows in by_run.items():
        acc = [r["test_accuracy"] for r in rows]
        seeds = ", ".join(str(r["seed"]) for r in sorted(rows, key=lambda r: r["seed"]))
        lines.append(
            f"| {name} | {seeds} | {statistics.mean(acc):.2%} ± {statistics.pstdev(acc):.2%} | "
            f"{min(acc):.2%} – {max(acc):.2%} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=HERE.parent.parent / "shared" / "data")
    parser.add_argument(
        "--runs",
        nargs="+",
        default=["few_shot", "full", "transfer"],
        choices=["few_shot", "full", "transfer"],
    )
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[DEFAULT_SEED], help="runtime.seed of each run [default: 13]"
    )
    parser.add_argument("--work", type=Path, default=HERE / "work", help="registry for the runs")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process: one run, JSON out
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.seeds[0], args.data_dir, args.work)))
        return
    if not (args.data_dir / "banking77" / "train_10.csv").is_file():
        sys.exit(f"error: BANKING77 not found under {args.data_dir}; pass --data-dir")
    results = []
    for name, seed in ((n, s) for n in args.runs for s in args.seeds):
        print(f"== {run_key(name, seed)}", flush=True)
        child = [sys.executable, __file__, "--one", name, "--seeds", str(seed)]
        results.append(child_result([*child, "--data-dir", str(args.data_dir), "--work", str(args.work)]))
        print(json.dumps(results[-1], indent=2), flush=True)
    machine = (
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, {'CUDA' if torch.cuda.is_available() else 'CPU only'}"
    )
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / "banking77.json"
    previous = json.loads(out.read_text()) if out.is_file() else {}
    merged = {**previous.get("runs", {}), **{r["run"]: r for r in results}}
    out.write_text(json.dumps({"machine": machine, "runs": merged}, indent=2))
    (args.results / "banking77.md").write_text(markdown(list(merged.values()), machine))
    print((args.results / "banking77.md").read_text())


if __name__ == "__main__":
    main()
