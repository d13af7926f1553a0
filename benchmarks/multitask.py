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

import itertools
import json
import time
from pathlib import Path

import harness

MODES = {
    "none": {},
    # One pass over the source: more passes specialise the encoder to CLINC150's intents.
    "sequential": {"source_training.epochs": 1},
    "joint": {"recipe": ["joint", "finetune"]},
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
        spread = harness.spread(acc)
        rows.append(
            {
                "mode": mode,
                "seeds": sorted(r["seed"] for r in mine),
                "accuracies": acc,
                "accuracy_mean": spread.mean,
                "accuracy_sd": spread.sd,
                "accuracy_min": spread.low,
                "accuracy_max": spread.high,
                "macro_f1_mean": harness.spread(r["test_macro_f1"] for r in mine).mean,
                "seconds_mean": harness.spread(r["source_seconds"] + r["train_seconds"] for r in mine).mean,
            }
        )
    return rows


def main() -> None:
    parser = harness.parser(__doc__, data=True, seeds=[1, 2, 3], work="multitask", one=True)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = parser.parse_args()
    if harness.answer(args, run_one):
        return
    harness.require(args.data_dir, "clinc150/train.csv", what="BANKING77 and CLINC150")
    machine = harness.machine()
    runs = harness.load("multitask", args.results, args.tag).get("runs", [])
    # Seed by seed: an interrupted benchmark has every mode of the seeds it did.
    for seed, mode in itertools.product(args.seeds, args.modes):
        print(f"== {mode}, seed {seed}", flush=True)
        result = harness.rerun(__file__, args, mode, seed=seed).json()
        runs = harness.keep_latest(runs, result, key=lambda r: (r["mode"], r["seed"]))
        print(json.dumps(result, indent=2), flush=True)
        result = {"machine": machine, "runs": runs, "summary": summary(runs)}
        text = harness.save("multitask", result, args.results, args.tag, echo=False)
    print(text)


if __name__ == "__main__":
    main()
