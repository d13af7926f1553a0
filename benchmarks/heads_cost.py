"""What the extra heads cost, on the bundled sample: each head's test accuracy over seeds, and
the serving cost of the urgency and sentiment heads. The serving cost is p50 and throughput
with and without them, measured in one run with the arms alternating.

    python benchmarks/heads_cost.py                      # seeds 1 2 3, then the serving cost
    python benchmarks/heads_cost.py --seeds 1 --repeats 3 --set training.epochs=5
    python benchmarks/heads_cost.py --serve-runtime onnx-int8 \\
        --model-intent benchmarks/work/heads/registry/northwind-intents-intent-only/v1 \\
        --model-heads benchmarks/work/heads/registry/northwind-intents-heads/v1   # no training

1. Accuracy. configs/sample.yaml (or --config, with --set overrides) is trained twice per seed
   into --work: once with data.tasks [] (intent only) and once with the config's tasks (intent +
   urgency + sentiment). The source stage's checkpoint does not depend on data.tasks, so each
   seed trains it once and both variants share it: they differ in the target stage alone. The
   report gives test accuracy and macro-F1 of each head, mean ± sd over the seeds, and the
   intent's accuracy with the heads minus without them, seed by seed.
2. Serving cost, on the first seed's two models (or --model-intent and --model-heads), on one
   runtime (--serve-runtime; freshly trained versions have no ONNX export, so auto means
   torch; export both with `transferdesk export` to measure int8).
   In process: IntentModel.predict on one model, then the other, --repeats rounds. It measures
   messages/s over batches of 16 on all threads, and one message's ms on one thread, as a
   classifier replica runs it.
   End to end: POST /v1/route, with the arms alternating as in capture_cost.py. Each arm is a
   fresh `serve run` of deployments/serve.yaml on CPU, with a routing policy generated for the
   model's intents. The shipped northwind.yaml has rules on the sentiment and urgency heads,
   which the intent-only model lacks. Load: the sample:retail test messages, one a request, at
   each --concurrency, --repeats runs per arm.
   Target (issue): p50 and throughput with the heads within 5% of intent only, at every level.
Writes results/heads_cost.{json,md}; the json is written once after training too, so the
accuracy part survives a failed serving part.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import harness
import numpy as np
from capture_cost import run_arm, summarise
from cpu_serving import routing_policy
from reports import INTENT_ONLY
from serve_load import messages

from transferdesk.cli.flags import add_config_flags, config_overrides
from transferdesk.config import INTENT_TASK, RUNTIMES, RunConfig
from transferdesk.errors import TransferDeskError

if TYPE_CHECKING:
    from transferdesk.registry import ModelVersion

TARGET = 0.05  # relative, on p50 and on throughput
# Set by the benchmark itself; a run setting for them would be silently overwritten.
RESERVED = {"runtime.seed": "--seeds", "output": "--work"}
SINGLE_MESSAGES, SINGLE_WARMUP = 300, 20  # as cpu_serving.in_process


def heads_arm(tasks: dict) -> str:
    return f"intent + {len(tasks)} heads"


def train_variant(config: Path, overrides: dict, seed: int, heads: bool, work: Path) -> ModelVersion:
    from transferdesk.config import load_config
    from transferdesk.training.train import train_and_register

    name = load_config(config, overrides).name
    settings = {
        "runtime.progress": False,
        **overrides,
        "output": str(work / "registry"),
        "runtime.seed": seed,
        "name": f"{name}-{'heads' if heads else 'intent-only'}",
    }
    if not heads:
        settings["data.tasks"] = []
    return train_and_register(load_config(config, settings))


def test_scores(version: ModelVersion) -> dict[str, dict]:
    """Head → test accuracy and macro-F1, from the version's metrics ({} without a test file)."""
    test = version.metrics.get("test")
    if not test:
        return {}
    heads = {INTENT_TASK: {"accuracy": test["accuracy"], "macro_f1": test["macro_f1"]}}
    for task, scores in test.get("tasks", {}).items():
        heads[task] = {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]}
    return heads


def run_record(arm: str, version: ModelVersion) -> dict:
    return {
        "arm": arm,
        "seed": version.config.runtime.seed,
        "model": str(version.path),
        "heads": test_scores(version),
        # Only the run that trained the seed's source stage has source_seconds; the other reused it.
        "source_seconds": version.metrics.get("source_seconds"),
    }


def accuracy_summary(runs: list[dict]) -> list[dict]:
    """Per head and arm: accuracy and macro-F1 over the seeds (population sd, as multitask.py)."""
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    heads = list(dict.fromkeys(h for r in runs for h in r["heads"]))
    rows = []
    for head in heads:
        for arm in arms:
            mine = [r["heads"][head] for r in runs if r["arm"] == arm and head in r["heads"]]
            if not mine:
                continue
            acc = harness.spread(m["accuracy"] for m in mine)
            f1 = harness.spread(m["macro_f1"] for m in mine)
            rows.append(
                {
                    "head": head,
                    "arm": arm,
                    "seeds": len(mine),
                    "accuracy_mean": acc.mean,
                    "accuracy_sd": acc.sd,
                    "macro_f1_mean": f1.mean,
                    "macro_f1_sd": f1.sd,
                }
            )
    return rows


def intent_deltas(runs: list[dict]) -> list[dict]:
    """Seed by seed: the intent's test accuracy with the heads minus without. Paired, because
    a seed moves both variants alike (the same source stage, splits and sampling)."""
    by_seed: dict[int, dict[str, float]] = {}
    for r in runs:
        if INTENT_TASK in r["heads"]:
            key = INTENT_ONLY if r["arm"] == INTENT_ONLY else "heads"
            by_seed.setdefault(r["seed"], {})[key] = r["heads"][INTENT_TASK]["accuracy"]
    return [
        {"seed": seed, "delta": pair["heads"] - pair[INTENT_ONLY]}
        for seed, pair in sorted(by_seed.items())
        if len(pair) == 2
    ]


def choose_runtime(versions: dict[str, ModelVersion], wanted: str) -> str:
    """One runtime for both arms: with auto, a version with an export and one without would
    otherwise compare int8 against torch."""
    from transferdesk.model.runtime import resolve_runtime

    chosen = {arm: resolve_runtime(version, wanted, "cpu")[0] for arm, version in versions.items()}
    if len(set(chosen.values())) > 1:
        sys.exit(
            f"error: --serve-runtime {wanted} resolves differently per model ({chosen}); "
            "name one runtime, or export both versions"
        )
    return next(iter(chosen.values()))


def in_process(
    versions: dict[str, ModelVersion], runtime: str, texts: list[str], args: argparse.Namespace
) -> dict:
    """IntentModel.predict (tokenize, forward, every head decoded) without Serve, the models
    alternating round by round, so that this CPU's drift hits both alike."""
    import torch

    from transferdesk.model.modeling import IntentModel

    threads = os.cpu_count() or 1
    # ONNX Runtime fixes its threads when a session is made: a model each for batches and singles.
    models = {
        arm: (
            IntentModel.from_pretrained(version, "cpu", runtime, threads),
            IntentModel.from_pretrained(version, "cpu", runtime, 1),
        )
        for arm, version in versions.items()
    }
    runs: dict[str, list[dict]] = {arm: [] for arm in models}
    for repeat in range(args.repeats):
        for arm, (batched, single) in models.items():
            print(f"== in process: {arm} (run {repeat + 1})", flush=True)
            torch.set_num_threads(threads)
            batched.predict(texts[:64], batch_size=16)
            done, start = 0, time.perf_counter()
            while time.perf_counter() - start < args.seconds:
                batched.predict(texts, batch_size=16)
                done += len(texts)
            per_s = done / (time.perf_counter() - start)
            torch.set_num_threads(1)
            latencies = []
            for text in texts[:SINGLE_MESSAGES]:
                t0 = time.perf_counter()
                single.predict([text])
                latencies.append((time.perf_counter() - t0) * 1000)
            runs[arm].append(
                {
                    "messages_per_s": per_s,
                    "single_p50_ms": float(np.percentile(latencies[SINGLE_WARMUP:], 50)),
                    "single_p95_ms": float(np.percentile(latencies[SINGLE_WARMUP:], 95)),
                }
            )
            print(f"{runs[arm][-1]}", flush=True)
    torch.set_num_threads(threads)
    rows = [
        {"arm": arm, **{k: statistics.median(run[k] for run in arm_runs) for k in arm_runs[0]}}
        for arm, arm_runs in runs.items()
    ]
    return {"threads": threads, "rows": rows, "runs": runs}


def end_to_end(
    versions: dict[str, ModelVersion], runtime: str, texts: list[str], args: argparse.Namespace
) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="heads-cost-"))
    policies = {
        arm: str(routing_policy(version.labels, scratch / f"policy-{i}.yaml"))
        for i, (arm, version) in enumerate(versions.items())
    }
    runs: dict[str, list[list[dict]]] = {}
    for repeat in range(args.repeats):
        for i, (arm, version) in enumerate(versions.items()):
            print(f"== serve: {arm} (run {repeat + 1})", flush=True)
            overrides = {"routing_policy": policies[arm], "runtime": runtime, "device": "cpu"}
            log = scratch / f"serve-{i}-{repeat}.log"
            levels, _ = run_arm(str(version.path.resolve()), overrides, args, log, texts)
            runs.setdefault(arm, []).append(levels)
    return {"rows": summarise(runs), "runs": runs, "logs": str(scratch)}


def compare(serving: dict) -> dict:
    """The heads arm against intent only, per concurrency, and the verdict on the target: a
    cost is a higher p50 or a lower throughput; the other direction always passes."""
    base = {row["concurrency"]: row for row in serving["rows"] if row["arm"] == INTENT_ONLY}
    levels = []
    for row in serving["rows"]:
        if row["arm"] == INTENT_ONLY:
            continue
        ref = base[row["concurrency"]]
        p50 = row["p50_ms"] / ref["p50_ms"] - 1
        throughput = row["messages_per_s"] / ref["messages_per_s"] - 1
        levels.append(
            {
                "concurrency": row["concurrency"],
                "p50_change": p50,
                "throughput_change": throughput,
                "met": p50 <= TARGET and throughput >= -TARGET,
            }
        )
    return {"target": TARGET, "levels": levels, "met": all(x["met"] for x in levels)}


def parse_args() -> tuple[argparse.Namespace, dict]:
    parser = harness.parser(__doc__, seeds=[1, 2, 3], work="heads")
    parser.add_argument("--config", type=Path, default=harness.ROOT / "configs" / "sample.yaml")
    parser.add_argument(
        "--model-intent", help="existing intent-only version (with --model-heads: no training)"
    )
    parser.add_argument("--model-heads", help="existing version with extra heads, the same intents")
    parser.add_argument(
        "--serve-runtime", default="auto", choices=RUNTIMES, help="of both arms, in process and in Serve"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--seconds", type=float, default=15, help="per level, and per in-process measurement")
    parser.add_argument(
        "--repeats",
        type=int,
        default=4,
        help="runs of each arm (fresh serve runs differ by more than 5%%; 2 did not resolve it)",
    )
    parser.add_argument("--port", type=int, default=8126)
    # The run config's settings as `transferdesk train` takes them: --training.epochs 5, --set ...
    add_config_flags(parser, RunConfig, aliases={})
    args = parser.parse_args()
    if (args.model_intent is None) != (args.model_heads is None):
        parser.error("--model-intent and --model-heads go together")
    try:
        overrides = config_overrides(args)
    except TransferDeskError as err:
        parser.error(str(err))
    for key, flag in RESERVED.items():
        if key in overrides:
            parser.error(f"{key} is set by the benchmark; use {flag}")
    return args, overrides


def main() -> None:
    args, overrides = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("transferdesk").setLevel(logging.INFO)  # training is long: show its stages

    from transferdesk.config import load_config
    from transferdesk.registry import open_version

    cfg = load_config(args.config, overrides)
    runs: list[dict] = []
    if args.model_intent:
        intent, heads = open_version(args.model_intent), open_version(args.model_heads)
        for version, arm in ((intent, INTENT_ONLY), (heads, heads_arm(heads.tasks))):
            runs.append(run_record(arm, version))
    else:
        if not cfg.data.tasks:
            sys.exit(f"error: {args.config} trains no heads beside the intent; give data.tasks")
        for seed in args.seeds:
            for with_heads in (False, True):
                print(f"== train: {'with' if with_heads else 'without'} heads, seed {seed}", flush=True)
                start = time.perf_counter()
                version = train_variant(args.config, overrides, seed, with_heads, args.work)
                arm = heads_arm(version.tasks) if with_heads else INTENT_ONLY
                runs.append({**run_record(arm, version), "wall_seconds": time.perf_counter() - start})
                print(runs[-1], flush=True)
                if seed == args.seeds[0] and with_heads:
                    heads = version
                elif seed == args.seeds[0]:
                    intent = version
    if intent.tasks or not heads.tasks:
        sys.exit(f"error: {intent.spec} must have no extra heads and {heads.spec} some")
    if intent.labels != heads.labels:
        sys.exit(f"error: {intent.spec} and {heads.spec} classify different intents")

    result = {
        "machine": harness.machine(),
        "config": str(args.config),
        "overrides": overrides,
        "tasks": list(heads.tasks),
        "test": heads.config.data.test,
        "seeds": sorted({r["seed"] for r in runs}),
        "accuracy": accuracy_summary(runs),
        "intent_deltas": intent_deltas(runs),
        "runs": runs,
        "serving": None,
    }
    harness.save("heads_cost", result, args.results, args.tag)

    versions = {INTENT_ONLY: intent, heads_arm(heads.tasks): heads}
    runtime = choose_runtime(versions, args.serve_runtime)
    texts = messages()
    serving = {
        "models": {arm: version.spec for arm, version in versions.items()},
        "runtime": runtime,
        "seconds": args.seconds,
        "repeats": args.repeats,
        "in_process": in_process(versions, runtime, texts, args),
        "end_to_end": end_to_end(versions, runtime, texts, args),
    }
    serving["verdict"] = compare(serving["end_to_end"])
    result["serving"] = serving
    harness.save("heads_cost", result, args.results, args.tag)


if __name__ == "__main__":
    main()
