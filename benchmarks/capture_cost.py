"""What capture for review costs serving: p50 and throughput of POST /v1/route with
`args.capture` off and on, in one run, arms alternating so that drift hits both alike.

    python benchmarks/capture_cost.py --model registry/banking77-10shot/v1 \\
        --data ../shared/data/banking77/test.csv

Arms: off; on at sample_rate 1.0 (every message written: the worst case); on at the default
sample_rate (hand-offs and 2% of the rest). Each arm is a fresh `serve run` of
deployments/serve.yaml on the model's default runtime, into a SQLite store in a scratch
directory, run --repeats times. Target (issue: the closed loop): p50 within 1 ms of off.
Writes results/capture_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import harness
import httpx
from cpu_serving import routing_policy, run_levels
from serve_load import serve_pids, start_serve


def arms(store: str) -> dict[str, dict]:
    return {
        "off": {"capture.enabled": False},
        "on, every message": {"capture.enabled": True, "capture.store": store, "capture.sample_rate": 1.0},
        "on, default sample": {"capture.enabled": True, "capture.store": store},
    }


def capture_totals(url: str, polls: int = 30) -> dict | None:
    """Written and lost over the Ingress replicas, from /readyz once the load has stopped and a
    flush has passed: each answer is one replica's view, static by then, so the distinct
    answers are the replicas'."""
    time.sleep(3)
    seen = set()
    for _ in range(polls):
        capture = httpx.get(f"{url}/readyz", timeout=10).json().get("capture")
        if capture is None:
            return None
        seen.add((capture["written"], capture["lost"], capture["pending"]))
    return {
        "replicas_seen": len(seen),
        "written": sum(w for w, _, _ in seen),
        "lost": sum(lost for _, lost, _ in seen),
        "pending": sum(p for _, _, p in seen),
    }


def run_arm(
    model_dir: str, overrides: dict, args: argparse.Namespace, log: Path, texts: list[str]
) -> tuple[list[dict], dict | None]:
    proc, _ = start_serve(model_dir, args.port, log, overrides)
    url = f"http://127.0.0.1:{args.port}"
    try:
        plan = [(c, 1) for c in args.concurrency]
        levels = run_levels(url, texts, plan, args.seconds, serve_pids())
        return levels, capture_totals(url)
    finally:
        harness.stop(proc, log=log)


def summarise(runs: dict[str, list[list[dict]]]) -> list[dict]:
    """Per arm and concurrency: the median over repeats of p50 and of messages/s."""
    rows = []
    for arm, repeats in runs.items():
        for i, first in enumerate(repeats[0]):
            levels = [repeat[i] for repeat in repeats]
            rows.append(
                {
                    "arm": arm,
                    "concurrency": first["concurrency"],
                    "p50_ms": statistics.median(x["p50_ms"] for x in levels),
                    "p99_ms": statistics.median(x["p99_ms"] for x in levels),
                    "messages_per_s": statistics.median(x["messages_per_s"] for x in levels),
                    "errors": sum(x["errors"] for x in levels),
                    "repeats": len(levels),
                }
            )
    return rows


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--model", required=True, help="registry version (an ONNX export makes it int8)")
    parser.add_argument("--data", required=True, help="file of messages to send (a text column)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--seconds", type=float, default=15, help="per level")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each arm")
    parser.add_argument("--port", type=int, default=8125)
    args = parser.parse_args()

    from transferdesk.data import read_dataset
    from transferdesk.registry import open_version
    from transferdesk.review.store import Store

    version = open_version(args.model)
    model_dir = str(version.path.resolve())
    texts = list(read_dataset(args.data, "text", "label")[0].texts)
    scratch = Path(tempfile.mkdtemp(prefix="capture-cost-"))
    store = f"sqlite:///{scratch / 'capture.db'}"
    policy = str(routing_policy(version.labels, scratch / "policy.yaml"))
    runs: dict[str, list[list[dict]]] = {}
    captured: dict[str, list[dict]] = {}  # per arm with capture on, per run: written and lost
    for repeat in range(args.repeats):
        for arm, overrides in arms(store).items():
            print(f"== {arm} (run {repeat + 1})", flush=True)
            log = scratch / f"serve-{len(runs.get(arm, []))}-{arm.split(',')[0]}.log"
            levels, totals = run_arm(model_dir, {**overrides, "routing_policy": policy}, args, log, texts)
            runs.setdefault(arm, []).append(levels)
            if totals is not None:
                print(json.dumps({"arm": arm, **totals}), flush=True)
                captured.setdefault(arm, []).append(totals)
    result = {
        "machine": harness.machine(),
        "model": version.spec,
        "seconds": args.seconds,
        "repeats": args.repeats,
        "captured": Store(store).tally().captured,
        "rows": summarise(runs),
        "capture": captured,
        "runs": runs,
    }
    harness.save("capture_cost", result, args.results, args.tag)


if __name__ == "__main__":
    main()
