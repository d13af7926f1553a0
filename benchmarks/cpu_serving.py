"""CPU serving benchmark: torch fp32 against ONNX Runtime fp32 and int8, in process and end to
end, and TransferDesk Serve, fused and split, against the plain single-process FastAPI app a
user would write.

    python benchmarks/cpu_serving.py --model registry/banking77-10shot/v1 \\
        --data ../shared/data/banking77/test.csv          # about an hour on 2 cores
    python benchmarks/cpu_serving.py --model registry/x/v1 --data sample:retail/test.csv \\
        --rounds 1 --runtimes --serve-runtimes onnx-int8 --peer-runtimes onnx-int8 \\
        --concurrency 1 --texts-per-request 1 --seconds 3 --warmup 1 --results /tmp/cpu-serving-smoke

One run, one machine, one load generator:
1. In process, per --runtimes: test accuracy on --data, messages/s over batches of 16 (all
   threads), and single-message latency (tokenize + forward) on one thread, as a Serve
   classifier replica runs it.
2. End to end, POST /v1/route (tokenize, classify, route), --rounds times (3), alternating
   within each round: per runtime (--serve-runtimes, --peer-runtimes: ONNX int8 and torch, of
   the same exported version), `serve run` of each --topologies (fused: deployments/serve.yaml;
   split: deployments/serve-split.yaml), then benchmarks/peer_app.py under uvicorn; each at
   every concurrency (1, 4, 16, 64), one and eight messages a request: p50/p95/p99,
   requests/s, errors, and the CPU milliseconds each process type spent per request (where the
   time goes). --floor adds Serve apps doing no work (benchmarks/floor_app.py) to each round.
3. The median over the rounds of each point, and the targets of issue #36 (ONNX int8, one
   message a request): the fused topology's p50 at concurrency 1 at most 1.2 times the
   peer's, its requests/s at concurrency 16 at least 1.5 times the peer's; the split
   topology's ratios beside them.
The model needs an ONNX export (`transferdesk export MODEL`). Writes
results/cpu_serving[-TAG].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import harness
import httpx
import numpy as np
import uvloop
import yaml
from serve_load import (
    KEY,
    LOAD_GENERATOR,
    ROOT,
    cpu_seconds,
    level,
    run_config,
    serve_config,
    serve_pids,
    start_serve,
)

from deployments.topology import DEPLOYMENTS

PEER = "peer (uvicorn)"  # the peer's process, in CPU per request
PEER_SERVER = "FastAPI + uvicorn peer"
# The Serve apps doing no work, and the topology whose deployments (and their settings) each has.
FLOORS = {
    "single": "Serve, no work: one deployment",
    "shape": "Serve, no work: Ingress → Tokenizer → Classifier → Router",
}
FLOOR_TOPOLOGY = {"single": "fused", "shape": "split"}
# Issue #36's targets, on ONNX int8 at one message a request: the fused topology's p50 at
# concurrency 1 at most P50_RATIO times the peer's; its requests/s at concurrency 16 at least
# THROUGHPUT_RATIO times the peer's. The split topology's ratios are reported beside them.
TARGET_RUNTIME = "onnx-int8"
P50_RATIO, P50_CONCURRENCY = 1.2, 1
THROUGHPUT_RATIO, THROUGHPUT_CONCURRENCY = 1.5, 16
MEDIANS = ("per_s", "messages_per_s", "p50_ms", "p95_ms", "p99_ms")


def serve_server(topology: str) -> str:
    """A Serve topology's name in the results' `server`."""
    return f"TransferDesk Serve ({topology})"


def routing_policy(labels: list[str], path: Path) -> Path:
    """Every intent routed, over five queues: the Router's work per message as in production."""
    routes = {label: {"destination": f"queue-{i % 5}"} for i, label in enumerate(labels)}
    policy = {"version": "benchmark", "fallback": {"destination": "human-agents"}, "routes": routes}
    path.write_text(yaml.safe_dump(policy))
    return path


def in_process(model_dir: str, runtime: str, texts: list[str], labels: list[str], seconds: float) -> dict:
    import torch

    from transferdesk.model.modeling import IntentModel

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    model = IntentModel.from_pretrained(model_dir, "cpu", runtime, threads)
    heads = model.predict_heads(texts, 64)
    accuracy = float(np.mean(np.array(model.decide(heads, out_of_scope=False)) == np.array(labels)))
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        model.predict_proba(texts[:256], batch_size=16)
        done += 256
    per_s = done / (time.perf_counter() - start)
    torch.set_num_threads(1)
    single = IntentModel.from_pretrained(model_dir, "cpu", runtime, 1)
    latencies = []
    for text in texts[:300]:
        t0 = time.perf_counter()
        single.predict_proba([text])
        latencies.append((time.perf_counter() - t0) * 1000)
    return {
        "runtime": runtime,
        "accuracy": accuracy,
        "batch16_per_s": per_s,
        "threads": threads,
        "single_p50_ms": float(np.percentile(latencies[20:], 50)),
        "single_p95_ms": float(np.percentile(latencies[20:], 95)),
    }


def start_peer(model_dir: str, runtime: str, policy: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PEER_MODEL": model_dir, "PEER_RUNTIME": runtime, "PEER_POLICY": str(policy)}
    env["PEER_KEY"] = KEY
    uvicorn = Path(sys.executable).with_name("uvicorn")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(uvicorn), "benchmarks.peer_app:app", "--port", str(port), "--log-level", "warning"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=out,
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            httpx.post(f"http://127.0.0.1:{port}/v1/route", json={"text": "hi"}, timeout=5)
            return proc
        except httpx.HTTPError:
            time.sleep(1)
        if proc.poll() is not None:
            sys.exit(f"error: the peer exited; see {log}")
    sys.exit(f"error: the peer did not come up; see {log}")


def floor_config(app: str) -> dict:
    """The proxy and deployment settings of the topology the floor app has the shape of
    (single: the fused one, deployments/serve.yaml; shape: the split one, serve-split.yaml),
    around benchmarks/floor_app.py's `app`, without the work."""
    topology = FLOOR_TOPOLOGY[app]
    config = serve_config(topology)
    deployments = [
        {k: v for k, v in d.items() if k not in ("user_config", "health_check_period_s")}
        for d in config["applications"][0]["deployments"]
        if d["name"] in DEPLOYMENTS[topology]
    ]
    config["applications"] = [
        {
            "name": "floor",
            "route_prefix": "/",
            "import_path": f"benchmarks.floor_app:{app}",
            "deployments": deployments,
        }
    ]
    return config


def run_levels(
    url: str,
    texts: list[str],
    plan: list[tuple[int, int]],
    seconds: float,
    pids: dict[int, str] | Callable[[], dict[int, str]],
    warmup: float = 10,
) -> list[dict]:
    """Each level of the plan after a short warm-up, with the CPU each process spent on it
    (`pids`, or those it gives at each level: HAProxy replaces its process when its config
    changes, after the service answers)."""
    uvloop.run(level(url, texts, plan[-1][0], warmup, 10**6, path="/v1/route"))
    results = []
    for concurrency, per_request in plan:
        now = pids() if callable(pids) else pids
        before = {**cpu_seconds(now), LOAD_GENERATOR: time.process_time()}
        result = uvloop.run(level(url, texts, concurrency, seconds, 20000, per_request, path="/v1/route"))
        after = {**cpu_seconds(now), LOAD_GENERATOR: time.process_time()}
        requests = max(result["requests"], 1)
        result["cpu_ms_per_request"] = {
            name: round((after[name] - before.get(name, 0.0)) * 1000 / requests, 3) for name in after
        }
        results.append(result)
        print(json.dumps(result), flush=True)
    return results


def point(row: dict) -> tuple:
    """What a result row measures, whichever round: server, runtime, concurrency, messages."""
    return row["server"], row["runtime"], row["concurrency"], row["texts_per_request"]


def summarize(rows: list[dict]) -> list[dict]:
    """Each point's rows over the rounds (in the order first run): the median of each of
    MEDIANS and of each process's CPU per request, the figures of each round (p50, requests/s),
    and the errors and requests of all rounds."""
    points: dict[tuple, list[dict]] = {}
    for row in rows:
        points.setdefault(point(row), []).append(row)
    summary = []
    for (server, runtime, concurrency, per_request), runs in points.items():
        processes = dict.fromkeys(name for r in runs for name in r.get("cpu_ms_per_request", {}))
        summary.append(
            {
                "server": server,
                "topology": runs[0].get("topology"),
                "runtime": runtime,
                "concurrency": concurrency,
                "texts_per_request": per_request,
                "rounds": len(runs),
                **{key: statistics.median(r[key] for r in runs) for key in MEDIANS},
                "p50_ms_rounds": [r["p50_ms"] for r in runs],
                "per_s_rounds": [r["per_s"] for r in runs],
                "requests": sum(r["requests"] for r in runs),
                "errors": sum(r["errors"] for r in runs),
                "cpu_ms_per_request": {
                    name: round(
                        statistics.median(r.get("cpu_ms_per_request", {}).get(name, 0.0) for r in runs), 3
                    )
                    for name in processes
                },
            }
        )
    return summary


def targets(summary: list[dict]) -> list[dict]:
    """Issue #36's targets from the summary (ONNX int8, one message a request): each topology's
    p50 at concurrency 1 and requests/s at concurrency 16 against the peer's. The fused
    topology's rows have a limit and `met`; the split one's are reported beside (limit and met
    None). Points not measured are left out."""
    at = {point(row): row for row in summary}

    def get(server: str, concurrency: int) -> dict | None:
        return at.get((server, TARGET_RUNTIME, concurrency, 1))

    rows = []
    measures = (
        (f"p50 ms at concurrency {P50_CONCURRENCY}", "p50_ms", P50_CONCURRENCY, P50_RATIO, "at most"),
        (
            f"requests/s at concurrency {THROUGHPUT_CONCURRENCY}",
            "per_s",
            THROUGHPUT_CONCURRENCY,
            THROUGHPUT_RATIO,
            "at least",
        ),
    )
    topologies = dict.fromkeys(row["topology"] for row in summary if row.get("topology"))
    for measure, key, concurrency, limit, sense in measures:
        peer = get(PEER_SERVER, concurrency)
        for topology in topologies:
            served = get(serve_server(topology), concurrency)
            if peer is None or served is None or not peer[key]:
                continue
            ratio = served[key] / peer[key]
            checked = topology == "fused"
            met = (ratio <= limit if sense == "at most" else ratio >= limit) if checked else None
            rows.append(
                {
                    "topology": topology,
                    "measure": measure,
                    "runtime": TARGET_RUNTIME,
                    "concurrency": concurrency,
                    "value": served[key],
                    "peer": peer[key],
                    "ratio": ratio,
                    "target": f"{sense} {limit:g}x the peer's" if checked else None,
                    "met": met,
                    "rounds": served[f"{key}_rounds"],
                    "peer_rounds": peer[f"{key}_rounds"],
                }
            )
    return rows


def servers(args: argparse.Namespace) -> list[tuple[str, str | None, str]]:
    """One round's servers, in order: (kind, what, runtime) with kind serve (what: its topology),
    peer or floor (what: the floor app). Per runtime the topologies, then the peer; the floors
    last."""
    order = [*dict.fromkeys([*args.serve_runtimes, *args.peer_runtimes])]
    plan: list[tuple[str, str | None, str]] = []
    for runtime in order:
        if runtime in args.serve_runtimes:
            plan += [("serve", topology, runtime) for topology in args.topologies]
        if runtime in args.peer_runtimes:
            plan.append(("peer", None, runtime))
    return plan + [("floor", app, "none") for app in args.floor]


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--model", required=True, help="registry version with an ONNX export")
    parser.add_argument("--data", required=True, help="labelled file: load messages and test accuracy")
    parser.add_argument(
        "--runtimes",
        nargs="*",
        default=["torch", "onnx", "onnx-int8"],
        help="in process (none: skip that part) [default: torch onnx onnx-int8]",
    )
    parser.add_argument(
        "--topologies",
        nargs="*",
        choices=list(DEPLOYMENTS),
        default=list(DEPLOYMENTS),
        help="the Serve topologies run end to end [default: fused split]",
    )
    parser.add_argument(
        "--serve-runtimes",
        nargs="*",
        default=["onnx-int8", "torch"],
        help="TransferDesk Serve's, in each topology [default: onnx-int8 torch]",
    )
    parser.add_argument(
        "--peer-runtimes",
        nargs="*",
        default=["onnx-int8", "torch"],
        help="the FastAPI peer's (none: no peer) [default: onnx-int8 torch]",
    )
    parser.add_argument(
        "--floor",
        nargs="*",
        default=[],
        choices=list(FLOORS),
        help="also Serve apps that do no work (benchmarks/floor_app.py): Serve's own cost",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="end-to-end rounds, the servers alternating [default: 3]"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--texts-per-request", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=15, help="per level [default: 15]")
    parser.add_argument(
        "--warmup", type=float, default=10, help="seconds of load before a server's levels [default: 10]"
    )
    parser.add_argument("--port", type=int, default=8124)
    args = parser.parse_args()

    from transferdesk.data import read_dataset
    from transferdesk.registry import open_version

    version = open_version(args.model)
    version.open_export()  # verified now, with what to do if missing, not after the first part
    model_dir = str(version.path.resolve())
    ds, _ = read_dataset(args.data, "text", "label")
    texts, labels = list(ds.texts), list(ds.labels)
    scratch = Path(tempfile.mkdtemp(prefix="cpu-serving-"))
    policy = routing_policy(version.labels, scratch / "policy.yaml")
    plan = [(c, n) for n in args.texts_per_request for c in args.concurrency]
    url = f"http://127.0.0.1:{args.port}"

    results = []
    for runtime in args.runtimes:
        print(f"== in process: {runtime}", flush=True)
        results.append(in_process(model_dir, runtime, texts, labels, args.seconds))
        print(json.dumps(results[-1]), flush=True)

    end_to_end = []
    for round_ in range(1, args.rounds + 1):
        for kind, what, runtime in servers(args):
            name = f"{kind} {what}" if what else kind
            print(f"== round {round_}/{args.rounds}: {name}, {runtime}", flush=True)
            log = scratch / f"{kind}-{what or runtime}-{runtime}-{round_}.log"
            if kind == "peer":
                proc = start_peer(model_dir, runtime, policy, args.port, log)
                pids, server, sig, grace = {proc.pid: PEER}, PEER_SERVER, signal.SIGTERM, 30
            elif kind == "serve":
                overrides = {"topology": what, "runtime": runtime, "routing_policy": str(policy)}
                proc, _ = start_serve(model_dir, args.port, log, overrides)
                pids, server, sig, grace = serve_pids, serve_server(what), signal.SIGINT, 120
            else:
                proc, _ = run_config(floor_config(what), args.port, log)
                pids, server, sig, grace = serve_pids, FLOORS[what], signal.SIGINT, 120
            try:
                levels = run_levels(url, texts, plan, args.seconds, pids, args.warmup)
            finally:
                harness.stop(proc, grace=grace, sig=sig, log=log)
            topology = what if kind == "serve" else None
            end_to_end += [
                {"server": server, "topology": topology, "runtime": runtime, "round": round_, **x}
                for x in levels
            ]
    summary = summarize(end_to_end)
    checked = targets(summary)
    for row in checked:
        verdict = {True: "met", False: "NOT MET", None: "reported"}[row["met"]]
        print(
            f"target {row['topology']}: {row['measure']} {row['value']:.1f} against the peer's "
            f"{row['peer']:.1f}: {row['ratio']:.2f}x ({row['target'] or 'beside'}): {verdict}",
            flush=True,
        )

    result = {
        "machine": harness.machine(),
        "model": version.spec,
        "data": args.data,
        "messages": len(texts),
        "export": version.open_export().meta.model_dump(),
        "rounds": args.rounds,
        "topologies": args.topologies,
        "seconds": args.seconds,
        "in_process": results,
        "end_to_end": end_to_end,
        "summary": summary,
        "targets": checked,
    }
    harness.save("cpu_serving", result, args.results, args.tag)


if __name__ == "__main__":
    main()
