"""CPU serving benchmark: torch fp32 against ONNX Runtime fp32 and int8, in process and end to
end, and TransferDesk Serve against the plain single-process FastAPI app a user would write.

    python benchmarks/cpu_serving.py --model registry/banking77-10shot/v1 \\
        --data ../shared/data/banking77/test.csv

One run, one machine, one load generator:
1. In process, per runtime: test accuracy on --data, messages/s over batches of 16 (all
   threads), and single-message latency (tokenize + forward) on one thread, as a Serve
   classifier replica runs it.
2. End to end, POST /v1/route (tokenize, classify, route): `serve run` of deployments/serve.yaml
   with each --serve-runtimes, then benchmarks/peer_app.py under uvicorn with each
   --peer-runtimes, at each concurrency, one and eight messages a request. Per level, the CPU
   milliseconds each process type spent per request: where the time goes.
The model needs an ONNX export (`transferdesk export MODEL`). Writes
results/cpu_serving.{json,md}.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
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
    serve_pids,
    start_serve,
)

PEER = "peer (uvicorn)"
FLOORS = {
    "single": "Serve, no work: one deployment",
    "shape": "Serve, no work: Ingress → Tokenizer → Classifier → Router",
}


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
    """deployments/serve.yaml's proxy and deployment settings around benchmarks/floor_app.py's
    `app` (single: the Ingress alone), without the work."""
    config = yaml.safe_load((ROOT / "deployments" / "serve.yaml").read_text())
    deployments = [
        {k: v for k, v in d.items() if k not in ("user_config", "health_check_period_s")}
        for d in config["applications"][0]["deployments"]
        if app == "shape" or d["name"] == "Ingress"
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
    url: str, texts: list[str], plan: list[tuple[int, int]], seconds: float, pids: dict[int, str]
) -> list[dict]:
    """Each level of the plan after a short warm-up, with the CPU each process spent on it."""
    uvloop.run(level(url, texts, plan[-1][0], 10, 10**6, path="/v1/route"))
    results = []
    for concurrency, per_request in plan:
        before = {**cpu_seconds(pids), LOAD_GENERATOR: time.process_time()}
        result = uvloop.run(level(url, texts, concurrency, seconds, 20000, per_request, path="/v1/route"))
        after = {**cpu_seconds(pids), LOAD_GENERATOR: time.process_time()}
        requests = max(result["requests"], 1)
        result["cpu_ms_per_request"] = {
            name: round((after[name] - before.get(name, 0.0)) * 1000 / requests, 3) for name in after
        }
        results.append(result)
        print(json.dumps(result), flush=True)
    return results


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--model", required=True, help="registry version with an ONNX export")
    parser.add_argument("--data", required=True, help="labelled file: load messages and test accuracy")
    parser.add_argument("--runtimes", nargs="*", default=["torch", "onnx", "onnx-int8"])
    parser.add_argument("--serve-runtimes", nargs="*", default=["torch", "onnx-int8"])
    parser.add_argument("--peer-runtimes", nargs="*", default=["torch", "onnx-int8"])
    parser.add_argument(
        "--floor",
        nargs="*",
        default=[],
        choices=list(FLOORS),
        help="also Serve apps that do no work (benchmarks/floor_app.py): Serve's own cost",
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--texts-per-request", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=15, help="per level")
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
    for runtime in args.serve_runtimes:
        print(f"== TransferDesk Serve: {runtime}", flush=True)
        log = scratch / f"serve-{runtime}.log"
        overrides = {"runtime": runtime, "routing_policy": str(policy)}
        proc, _ = start_serve(model_dir, args.port, log, overrides)
        try:
            levels = run_levels(url, texts, plan, args.seconds, serve_pids())
        finally:
            harness.stop(proc)
        end_to_end += [{"server": "TransferDesk Serve", "runtime": runtime, **x} for x in levels]
    for app in args.floor:
        print(f"== Serve doing no work: {app}", flush=True)
        proc, _ = run_config(floor_config(app), args.port, scratch / f"floor-{app}.log")
        try:
            levels = run_levels(url, texts, plan, args.seconds, serve_pids())
        finally:
            harness.stop(proc)
        end_to_end += [{"server": FLOORS[app], "runtime": "none", **x} for x in levels]
    for runtime in args.peer_runtimes:
        print(f"== peer: {runtime}", flush=True)
        proc = start_peer(model_dir, runtime, policy, args.port, scratch / f"peer-{runtime}.log")
        try:
            levels = run_levels(url, texts, plan, args.seconds, {proc.pid: PEER})
        finally:
            harness.stop(proc, grace=30, sig=signal.SIGTERM)
        end_to_end += [{"server": "FastAPI + uvicorn peer", "runtime": runtime, **x} for x in levels]

    result = {
        "machine": harness.machine(),
        "model": version.spec,
        "data": args.data,
        "messages": len(texts),
        "export": version.open_export().meta.model_dump(),
        "in_process": results,
        "end_to_end": end_to_end,
    }
    harness.save("cpu_serving", result, args.results, args.tag)


if __name__ == "__main__":
    main()
