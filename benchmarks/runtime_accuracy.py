"""Accuracy of each runtime over seeds: versions of the same recipe trained with different
seeds, each exported (the export's own check on validation data, each runtime with its own
out-of-scope threshold) and scored on the test file on torch, ONNX fp32 and ONNX int8.

    python benchmarks/runtime_accuracy.py registry/b77-seed1/v1 registry/b77-seed2/v1 \\
        registry/b77-seed3/v1 --valid ../shared/data/banking77/valid.csv \\
        --test ../shared/data/banking77/test.csv

An export is made again (--replace) unless --keep-exports, with the check's allowance opened
wide so that every runtime is scored; the table says which the default check (0.5 points)
would have refused. Writes results/runtime_accuracy.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

from serve_load import write_results

HERE = Path(__file__).resolve().parent
RUNTIMES = ("torch", "onnx", "onnx-int8")
DEFAULT_ALLOWANCE = 0.5  # ExportConfig.max_accuracy_drop's default, in points (1,540 rows: above one message)


def measure(spec: str, args: argparse.Namespace) -> dict:
    from transferdesk.config import ExportConfig
    from transferdesk.data import read_dataset
    from transferdesk.evaluation.metrics import evaluate
    from transferdesk.model.export import export_version
    from transferdesk.model.modeling import IntentModel
    from transferdesk.registry import open_version

    version = open_version(spec)
    result: dict = {"version": version.spec, "seed": version.config.runtime.seed}
    if not args.keep_exports:
        export_version(version.path, ExportConfig(data=str(args.valid), replace=True, max_accuracy_drop=100))
    export = open_version(spec).open_export()
    result["check"] = {r: c.model_dump() for r, c in export.meta.runtimes.items()}
    test, _ = read_dataset(str(args.test), "text", "label")
    for runtime in RUNTIMES:
        model = IntentModel.from_pretrained(version.path, "cpu", runtime)
        scores = evaluate(model, test, batch_size=64, progress=False)
        result[runtime] = {"test_accuracy": scores["accuracy"], "threshold": model.threshold}
        print(json.dumps({"version": version.spec, "runtime": runtime, **result[runtime]}), flush=True)
    return result


def markdown(r: dict) -> str:
    seeds = ", ".join(str(x["seed"]) for x in r["versions"])
    lines = [
        f"Measured on {r['machine']}. Versions: {', '.join(x['version'] for x in r['versions'])}; "
        f"export checked on {r['valid']}, test accuracy on {r['test']} (no out-of-scope rows: top intent "
        "alone, whatever the threshold). Mean ± sd (population) over seeds "
        f"{seeds}.",
        "",
        "| runtime | test accuracy | per seed | against torch fp32 | export check on validation, per seed: "
        "accuracy, same top intent |",
        "| --- | --- | --- | --- | --- |",
    ]
    for runtime in RUNTIMES:
        accs = [100 * x[runtime]["test_accuracy"] for x in r["versions"]]
        diffs = [100 * (x[runtime]["test_accuracy"] - x["torch"]["test_accuracy"]) for x in r["versions"]]
        checks = [x["check"].get(runtime) for x in r["versions"]]
        check = "; ".join(
            f"{100 * c['accuracy']:.2f}% vs torch {100 * c['torch_accuracy']:.2f}%, "
            f"{100 * c['argmax_agreement']:.2f}% same"
            + (" (**refused** at 0.5)" if c["accuracy_drop_points"] > DEFAULT_ALLOWANCE + 1e-6 else "")
            for c in checks
            if c
        )
        lines.append(
            f"| {runtime} | {statistics.mean(accs):.2f}% ± {statistics.pstdev(accs):.2f} | "
            f"{', '.join(f'{a:.2f}' for a in accs)} | {statistics.mean(diffs):+.2f} points | {check or '—'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("versions", nargs="+", help="registry versions of one recipe, seeds apart")
    parser.add_argument("--valid", type=Path, required=True, help="the versions' validation file")
    parser.add_argument("--test", type=Path, required=True, help="labelled test file")
    parser.add_argument("--keep-exports", action="store_true", help="score the exports as they are")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, CPU only",
        "valid": args.valid.name,
        "test": args.test.name,
        "versions": [measure(spec, args) for spec in args.versions],
    }
    write_results(args.results, "runtime_accuracy", "", result, markdown(result))


if __name__ == "__main__":
    main()
