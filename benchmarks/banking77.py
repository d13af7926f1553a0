"""BANKING77 benchmark of the default recipe: few-shot, full data, and with a source stage.

    python benchmarks/banking77.py                      # all three runs (about 30 min on 2 cores)
    python benchmarks/banking77.py --runs few_shot      # just the 10-shot run
    python benchmarks/banking77.py --runs few_shot --seeds 13 1 2 3   # and its seed spread

Reads ../shared/data (override with --data-dir), writes results/banking77.{json,md}.
Each run is a separate process so its peak memory is its own.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import harness
from reports import DEFAULT_SEED

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
        "predict_per_s": metrics["test"]["speed"]["throughput_per_s"],
        "latency_ms_p50": metrics["test"]["speed"]["latency_ms_p50"],
        "model": str(version.path),
        "published": PUBLISHED[name],
    }


def main() -> None:
    parser = harness.parser(__doc__, data=True, seeds=[DEFAULT_SEED], work="", one=True)
    parser.add_argument("--runs", nargs="+", default=list(PUBLISHED), choices=list(PUBLISHED))
    args = parser.parse_args()
    if harness.answer(args, run_one):
        return
    harness.require(args.data_dir, "banking77/train_10.csv", what="BANKING77")
    results = []
    for name, seed in itertools.product(args.runs, args.seeds):
        print(f"== {run_key(name, seed)}", flush=True)
        child = harness.rerun(__file__, args, name, seed=seed)
        results.append({**child.json(), "peak_rss_gib": child.peak_rss_gib})  # the run's process alone
        print(json.dumps(results[-1], indent=2), flush=True)
    previous = harness.load("banking77", args.results, args.tag)
    merged = {**previous.get("runs", {}), **{r["run"]: r for r in results}}
    harness.save("banking77", {"machine": harness.machine(), "runs": merged}, args.results, args.tag)


if __name__ == "__main__":
    main()
