"""Ray Serve load benchmark: end-to-end HTTP throughput and latency against the raw
in-process ceiling of the same model, on this machine.

    python benchmarks/serve_load.py                        # model: registry/northwind-tuned
    python benchmarks/serve_load.py --model registry/x/v3 --seconds 20
    python benchmarks/serve_load.py --precision bf16 --tag bf16
    python benchmarks/serve_load.py --topology split --tag split

1. Ceiling: the model's batched predict loop in this process (no HTTP, no Serve).
2. `serve run` of the --topology's Serve config (deployments/serve.yaml, fused, the default;
   deployments/serve-split.yaml, split) with that model; an aiohttp load generator on uvloop
   sends one message a request to 127.0.0.1 at several concurrency levels, each bounded
   in time, and records requests/s, p50/p95/p99 latency and errors. It shares the CPUs
   with the server, so it should be light: 0.4 ms of CPU a request at concurrency 16,
   where an httpx client took 1.8-2.2 ms.
3. CPU seconds each Serve process and the load generator used during the load (which
   deployment is the bottleneck), and the replicas that hold the classifier (the Ingress's in
   the fused topology, the Classifier's in the split one): their count and resident memory.
Writes results/serve_load[-TAG].{json,md}.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import harness
import httpx
import numpy as np
import uvloop
import yaml

from deployments.cli import SERVE_YAMLS
from deployments.config import FAST_PATH_ENV, ServeArgs, Topology, serve_env
from deployments.processes import sigint_default
from deployments.topology import CLASSIFIER_CONFIG, DEFAULT, DEPLOYMENTS, topology_of
from transferdesk.cli.flags import add_config_flags, config_overrides
from transferdesk.config import set_dotted

ROOT = harness.ROOT
KEY = "benchmark-key-0123456789"  # 16 characters at least
# The Serve processes counted, by name: every deployment of either topology, and Ray's proxy.
SERVE_PROCESSES = (*dict.fromkeys(d for names in DEPLOYMENTS.values() for d in names), "ProxyActor")
HAPROXY = re.compile(r"(^|/)haproxy\s")  # Serve's HTTP proxy on the fast data path
FRONT_DOOR = "front door"  # deployments/front.py: an HAProxy of ours, in front of Serve's
LOAD_GENERATOR = "load generator"  # this process: it takes its CPU from the same 2 cores


def messages() -> list[str]:
    from transferdesk.data import read_dataset

    ds, _ = read_dataset("sample:retail/test.csv", "text", "label")
    return list(ds.texts)


def ceiling(model_dir: str, texts: list[str], batch_size: int, seconds: float, precision: str) -> dict:
    import torch

    from transferdesk.model.modeling import IntentModel

    torch.set_num_threads(os.cpu_count() or 1)
    model = IntentModel.from_pretrained(model_dir, "cpu")
    model.for_serving(precision)  # as the classifier replicas will run it
    model.predict_proba(texts[:batch_size])  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        model.predict_proba(texts, batch_size=batch_size)
        done += len(texts)
    return {
        "per_s": done / (time.perf_counter() - start),
        "batch_size": batch_size,
        "threads": os.cpu_count(),
        "precision": precision,
    }


def serve_config(topology: Topology = DEFAULT) -> dict:
    """The topology's Serve config as deployments/ has it (serve.yaml: fused; serve-split.yaml:
    split)."""
    config = yaml.safe_load(SERVE_YAMLS[topology].read_text())
    if (found := topology_of(config["applications"][0])) != topology:
        raise ValueError(f"{SERVE_YAMLS[topology]} serves the {found} topology, not {topology}")
    return config


def classifier_process(topology: Topology) -> str:
    """The Serve process (deployment) whose replicas hold the classifier: the Ingress in the
    fused topology, the Classifier in the split one."""
    return CLASSIFIER_CONFIG[topology]


def start_serve(model_dir: str, port: int, log: Path, overrides: dict) -> tuple[subprocess.Popen, Path]:
    """`serve run` of the Serve config of the topology `overrides` name (the default: fused,
    deployments/serve.yaml) with this model and app args; returns the process and the config it
    runs (`serve deploy` a changed copy to change it in place)."""
    config = serve_config(overrides.get("topology", DEFAULT))
    app_args = config["applications"][0]["args"]
    app_args["model"] = str(Path(model_dir).resolve())
    for key, value in overrides.items():
        set_dotted(app_args, key, value)
    return run_config(config, port, log)


def run_config(config: dict, port: int, log: Path) -> tuple[subprocess.Popen, Path]:
    """`serve run` of a Serve config behind the front door at `port`, as `transferdesk serve`
    runs it, once /readyz answers 200."""
    config["http_options"]["port"] = port
    path = Path(tempfile.mkdtemp()) / "serve.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    # A throwaway cluster on loopback: without Ray's token auth, `serve deploy` needs no token.
    env = {**serve_env(), "TRANSFERDESK_API_KEYS": KEY, "RAY_AUTH_MODE": "disabled"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "deployments.front", str(path)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=out,
            preexec_fn=sigint_default,
        )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                return proc, path
        except httpx.HTTPError:
            time.sleep(2)
        if proc.poll() is not None:
            sys.exit(f"error: serve run exited; see {log}")
    sys.exit(f"error: the service did not come up; see {log}")


async def level(
    url: str,
    texts: list[str],
    concurrency: int,
    seconds: float,
    max_requests: int,
    per_request: int = 1,
    path: str = "/v1/classify",
) -> dict:
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    headers = {"Authorization": f"Bearer {KEY}"}

    async def user(session: aiohttp.ClientSession, offset: int) -> None:
        nonlocal errors
        i = offset
        while time.perf_counter() < stop and len(latencies) + errors < max_requests:
            batch = [texts[(i + j) % len(texts)] for j in range(per_request)]
            t0 = time.perf_counter()
            try:
                async with session.post(path, json={"texts": batch}, headers=headers) as r:
                    await r.read()
                    ok = r.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if ok:
                latencies.append((time.perf_counter() - t0) * 1000)
            else:
                errors += 1
            i += concurrency

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        await asyncio.gather(*(user(session, k) for k in range(concurrency)))
        wall = time.perf_counter() - start
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99]) if latencies else (np.nan,) * 3
    return {
        "concurrency": concurrency,
        "texts_per_request": per_request,
        "requests": len(latencies),
        "errors": errors,
        "per_s": len(latencies) / wall,
        "messages_per_s": len(latencies) * per_request / wall,
        "p50_ms": float(p50),
        "p95_ms": float(p95),
        "p99_ms": float(p99),
    }


def serve_pids() -> dict[int, str]:
    """The Serve processes running on this machine: pid → deployment name, ProxyActor or HAProxy."""
    return parse_ps(subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout)


def parse_ps(out: str) -> dict[int, str]:
    """`ps -eo pid,args`'s output, read for SERVE_PROCESSES, Serve's HAProxy and the front door."""
    pids = {}
    for line in out.splitlines()[1:]:
        pid, _, args = line.strip().partition(" ")
        for name in SERVE_PROCESSES:
            if re.search(rf"ray::(ServeReplica:\w+:)?{name}\b", args):
                pids[int(pid)] = name
        if HAPROXY.search(args):
            pids[int(pid)] = FRONT_DOOR if args.rstrip().endswith("/front.cfg") else "HAProxy"
    return pids


def cpu_seconds(pids: dict[int, str]) -> dict[str, float]:
    totals: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for pid, name in pids.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        totals[name] = totals.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return totals


def rss_gib(pids: dict[int, str], name: str) -> list[float]:
    sizes = []
    for pid, process in pids.items():
        if process == name:
            status = Path(f"/proc/{pid}/status").read_text()
            sizes.append(int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 2**20)
    return sizes


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    parser.add_argument(
        "--batched", type=int, default=8, help="then requests of this many texts, at concurrency 4 and 16"
    )
    parser.add_argument("--seconds", type=float, default=20, help="per concurrency level")
    parser.add_argument("--warmup", type=float, default=45, help="seconds of load before measuring")
    parser.add_argument("--max-requests", type=int, default=20000, help="per concurrency level")
    parser.add_argument("--port", type=int, default=8123)
    # The app's args as `transferdesk serve` takes them: --model DIR, --precision bf16, --set top_k=5.
    add_config_flags(parser, ServeArgs, aliases={})
    args = parser.parse_args()

    from transferdesk.registry import open_version

    overrides = config_overrides(args)
    topology = overrides.get("topology", DEFAULT)
    holder = classifier_process(topology)
    model_dir = str(open_version(overrides.pop("model", ServeArgs().model)).path)
    texts = messages()
    precision = overrides.get("precision", "auto")
    print("== ceiling", flush=True)
    first = ceiling(model_dir, texts, 16, args.seconds, precision)
    print(json.dumps(first), flush=True)
    log = Path(tempfile.mkdtemp()) / "serve.log"
    proc, _ = start_serve(model_dir, args.port, log, overrides)
    url = f"http://127.0.0.1:{args.port}"
    plan = [(c, 1) for c in args.concurrency] + [(c, args.batched) for c in (4, 16) if args.batched > 1]
    levels: list[dict] = []
    cpu: dict[str, float] = {}
    try:
        # Low load first, at the replicas low load keeps (autoscaling's minimum); then a warm-up
        # at the highest load, long enough for autoscaling to add replicas, and the rest.
        for phase, warmup in ((plan[:1], (plan[0][0], 5)), (plan[1:], (max(args.concurrency), args.warmup))):
            uvloop.run(level(url, texts, warmup[0], warmup[1], 10**6))
            pids = serve_pids()
            before = {**cpu_seconds(pids), LOAD_GENERATOR: time.process_time()}
            for concurrency, per_request in phase:
                replicas = sum(name == holder for name in serve_pids().values())
                load = level(url, texts, concurrency, args.seconds, args.max_requests, per_request)
                levels.append({**uvloop.run(load), "classifier_replicas": replicas})
                print(json.dumps(levels[-1]), flush=True)
            pids = serve_pids()  # autoscaling may have added replicas
            for name, seconds in {**cpu_seconds(pids), LOAD_GENERATOR: time.process_time()}.items():
                cpu[name] = cpu.get(name, 0.0) + seconds - before.get(name, 0.0)
        rss = rss_gib(pids, holder)
    finally:
        harness.stop(proc, log=log)
    # Again on the quiet machine: this CPU's speed drifts between runs; the faster one counts.
    second = ceiling(model_dir, texts, 16, args.seconds, precision)
    runs = [first["per_s"], second["per_s"]]
    result = {
        "machine": harness.machine(),
        "model": model_dir,
        "serve_env": {k: serve_env()[k] for k in FAST_PATH_ENV},
        "app_args": overrides,
        "topology": topology,
        "classifier_process": holder,  # whose replicas classifier_replicas and _rss_gib count
        "ceiling": {**max(first, second, key=lambda c: c["per_s"]), "runs": runs},
        "levels": levels,
        "cpu_seconds_under_load": cpu,
        "classifier_rss_gib": rss,
    }
    harness.save("serve_load", result, args.results, args.tag)


if __name__ == "__main__":
    main()
