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

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from banking77 import PUBLISHED

from transferdesk.registry import open_version

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIG = ROOT / "configs" / "banking77-tune.yaml"


def run_search(work: Path) -> tuple[Path, float]:
    shutil.rmtree(work, ignore_errors=True)
    command = [
        sys.executable, "-m", "tuning", str(CONFIG),
        "--output", str(work / "registry"),
        "--search.storage_path", str(work / "tune_results"),
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True)
    return Path(proc.stdout.strip().splitlines()[-1]), time.perf_counter() - start


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
    untuned = json.loads((HERE / "results" / "banking77.json").read_text())["runs"]["few_shot"]
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


def markdown(r: dict) -> str:
    v = r["valid_accuracy"]
    lines = [
        "BANKING77, 10 examples per intent (`train_10.csv`), selection on `valid.csv`, "
        "scored once on `test.csv`; 2 CPU cores, bundled all-MiniLM-L6-v2 (22M parameters).",
        "",
        "| | test accuracy | macro-F1 |",
        "| --- | --- | --- |",
        f"| tuned (exported model) | {r['test_accuracy']:.2%} | {r['test_macro_f1']:.2%} |",
        f"| default recipe, untuned (`benchmarks/banking77.py`) | "
        f"{r['untuned_default_recipe_test_accuracy']:.2%} | |",
        f"| published | {r['published']} | |",
        "",
        f"Whole search, source stages included: {r['wall_seconds'] / 60:.1f} min, {r['trials']} trials "
        f"({r['stopped_early']} stopped early). Chosen: `{json.dumps(r['chosen'])}`.",
        "",
        "| candidate | valid accuracy, default recipe | valid accuracy, best trial |",
        "| --- | --- | --- |",
    ]
    for name, best in v["best_by_candidate"].items():
        base = v["default_recipe_by_candidate"].get(name)
        lines.append(f"| {name} | {'' if base is None else f'{base:.2%}'} | {best:.2%} |")
    if v["gain_from_source"] is not None:
        lines += [
            "",
            f"Validation accuracy gained by the chosen trial over the default recipe on MiniLM as it is: "
            f"{v['gain_total']:+.2%}, of which the source-model choice {v['gain_from_source']:+.2%} "
            f"(default recipe on both) and the hyperparameters {v['gain_from_hyperparameters']:+.2%} "
            "(the chosen trial against the default recipe on its candidate).",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=HERE / "work" / "tune", help="registry and Tune state")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--summarize", type=Path, help="only rewrite the results of this exported version")
    args = parser.parse_args()
    if not (ROOT.parent / "shared" / "data" / "banking77" / "train_10.csv").is_file():
        sys.exit("error: ../shared/data/banking77 not found (the config reads it from there)")
    if args.summarize:  # figures again from an exported search, with its measured wall time
        version = args.summarize
        wall = json.loads((args.results / "banking77_tune.json").read_text())["wall_seconds"]
    else:
        version, wall = run_search(args.work.resolve())
    result = summarize(version, wall)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "banking77_tune.json").write_text(json.dumps(result, indent=2))
    (args.results / "banking77_tune.md").write_text(markdown(result))
    shutil.copy(open_version(version).search_dir / "curves.png", args.results / "banking77_tune_curves.png")
    shutil.copy(open_version(version).search_dir / "trials.md", args.results / "banking77_tune_trials.md")
    print(markdown(result))


if __name__ == "__main__":
    main()
