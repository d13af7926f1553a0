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
from pathlib import Path

import harness
from reports import RUNTIMES


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


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("versions", nargs="+", help="registry versions of one recipe, seeds apart")
    parser.add_argument("--valid", type=Path, required=True, help="the versions' validation file")
    parser.add_argument("--test", type=Path, required=True, help="labelled test file")
    parser.add_argument("--keep-exports", action="store_true", help="score the exports as they are")
    args = parser.parse_args()
    result = {
        "machine": harness.machine(),
        "valid": args.valid.name,
        "test": args.test.name,
        "versions": [measure(spec, args) for spec in args.versions],
    }
    harness.save("runtime_accuracy", result, args.results, args.tag)


if __name__ == "__main__":
    main()
