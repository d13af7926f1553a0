"""BANKING77 10-shot tuning benchmark: Ray Tune over source models and hyperparameters.

    python benchmarks/banking77_tune.py        # about 80 minutes on 2 CPU cores

Runs `transferdesk tune configs/banking77-tune.yaml` from scratch (fresh registry, so the
CLINC150 source stages are trained and timed too), then writes
results/banking77_tune.{json,md} and results/banking77_tune_curves.png. The baseline
trials (the default recipe on each candidate, see search.baseline) split the gain into
what the source-model choice bought and what the hyperparameter search bought; both are
measured on validation data, since the test split is scored once, on the exported model.
"""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

import harness
from banking77 import PUBLISHED

from transferdesk.registry import open_version

CONFIG = harness.ROOT / "configs" / "banking77-tune.yaml"


def run_search(work: Path) -> tuple[Path, float]:
    shutil.rmtree(work, ignore_errors=True)
    command = [
        sys.executable, "-m", "tuning", str(CONFIG),
        "--output", str(work / "registry"),
        "--search.storage_path", str(work / "tune_results"),
    ]  # fmt: skip
    search = harness.run_child(command, cwd=harness.ROOT)
    return Path(search.stdout.strip().splitlines()[-1]), search.wall_seconds


def summarize(version: Path, wall: float) -> dict:
    exported = open_version(version)
    metrics = exported.metrics
    with open(exported.search_dir / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    valid = {r["trial"]: float(r["best_accuracy"]) for r in rows if r["best_accuracy"] != "nan"}
    baseline = {
        r["candidate"]: valid[r["trial"]] for r in rows if r["baseline"] == "True" and r["trial"] in valid
    }
    best_by_candidate: dict[str, float] = {}
    for r in rows:
        if r["trial"] in valid:
            name = r["candidate"]
            best_by_candidate[name] = max(best_by_candidate.get(name, 0.0), valid[r["trial"]])
    best = max(rows, key=lambda r: valid.get(r["trial"], 0.0))
    best_valid, chosen = valid[best["trial"]], best["candidate"]
    plain = baseline.get("minilm")
    untuned = harness.load("banking77")["runs"]["few_shot"]
    return {
        "test_accuracy": metrics["accuracy"],
        "test_macro_f1": metrics["macro_f1"],
        "chosen": metrics["search"]["best_config"],
        "wall_seconds": wall,
        "trials": len(rows),
        "stopped_early": sum(r["stopped_early"] == "True" for r in rows),
        "valid_accuracy": {
            "default_recipe_by_candidate": baseline,
            "best_by_candidate": best_by_candidate,
            "best": best_valid,
            # The chosen trial's gain over the default recipe on the bundled MiniLM, split in
            # two: its source model (default recipe on both) and its hyperparameters.
            "gain_from_source": baseline[chosen] - plain
            if plain is not None and chosen in baseline
            else None,
            "gain_from_hyperparameters": best_valid - baseline[chosen] if chosen in baseline else None,
            "gain_total": best_valid - plain if plain is not None else None,
        },
        "untuned_default_recipe_test_accuracy": untuned["test_accuracy"],
        "published": PUBLISHED["transfer"],
        "model": str(version),
    }


def main() -> None:
    parser = harness.parser(__doc__, work="tune")
    parser.add_argument("--summarize", type=Path, help="only rewrite the results of this exported version")
    args = parser.parse_args()
    harness.require(
        harness.DATA, "banking77/train_10.csv", what="BANKING77", hint="the config reads it from there"
    )
    name = harness.stem("banking77_tune", args.tag)
    if args.summarize:  # figures again from an exported search, with its measured wall time
        version = args.summarize
        wall = harness.load("banking77_tune", args.results, args.tag)["wall_seconds"]
    else:
        version, wall = run_search(args.work.resolve())

    def copy_search_files(path: Path) -> None:
        search = open_version(version).search_dir
        shutil.copy(search / "curves.png", path.with_name(f"{name}_curves.png"))
        shutil.copy(search / "trials.md", path.with_name(f"{name}_trials.md"))

    harness.save("banking77_tune", summarize(version, wall), args.results, args.tag, also=copy_search_files)


if __name__ == "__main__":
    main()
