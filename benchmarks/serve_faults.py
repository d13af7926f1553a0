"""What an operator sees when things go wrong under load: the Serve app on 127.0.0.1 under a
steady load (bounded in time and count), one event at a time, in each topology.

    python benchmarks/serve_faults.py                      # both topologies: about 25 minutes on 2 cores
    python benchmarks/serve_faults.py --topologies fused --tag fused

Each topology (--topologies: fused, deployments/serve.yaml; split, deployments/serve-split.yaml)
is started in turn, and the events played against it: a replica holding the classifier killed
(in the fused topology an Ingress replica, which holds it; in the split one a Classifier
replica, then an Ingress replica), Serve's HTTP proxy (HAProxy, or Ray's ProxyActor where the
fast path is off) and then the front door in front of it (deployments/front.py, as `transferdesk
serve` runs it) each killed twice, with clients that retry a refused connection after 50 ms and
with clients that retry at once, a switch to a corrupted version (one flipped byte), a switch to a
version whose head gives NaN, a 10% canary and its promotion, a rollback, and an overload at
about 10x capacity for 20 s. For each: requests sent, failed (neither 200 nor a retryable
503), 503s, the longest gap without a success, and p99 latency before, during and after.
Targets (issue #36): a dead proxy costs at most 5 s without a success with clients that retry
after 50 ms, at most 15 s with clients that retry at once, and no 404s; 0 failed requests for
the refused switches, canary and promotion, and rollback. Two versions of the bundled model are
trained on the sample data first (a minute). Writes results/serve_faults.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import harness
import httpx
import numpy as np
import torch
import uvloop
import yaml
from reports import WINDOW_S
from serve_load import FRONT_DOOR, KEY, ROOT, classifier_process, messages, serve_pids, start_serve

from deployments.config import Topology
from deployments.processes import installed_command
from deployments.topology import DEPLOYMENTS, classifier_deployment
from transferdesk.config import load_config
from transferdesk.model.modeling import IntentModel
from transferdesk.registry import Registry, open_version
from transferdesk.training.train import train_and_register

SETTLE_S = 60.0  # longest an event may take to play out
HEADERS = {"Authorization": f"Bearer {KEY}"}
RETRY_S = 0.05  # the steady clients retry a refused connection after this; 0: at once
# The most seconds without a successful request when the proxy is killed, by the clients' retry
# delay (issue #36): clients that wait 50 ms, and clients that retry at once (as wrk does).
PROXY_GAP_S = {RETRY_S: 5.0, 0.0: 15.0}
# Events that must fail no request (503 with Retry-After is not a failure).
NO_FAILURES = ("switch_refused", "canary_promote", "rollback")


@dataclass(slots=True)
class Record:
    start: float
    end: float
    status: int  # 0: no HTTP answer (connection refused or reset, time-out)
    version: str = ""
    code: str = ""  # error.code of a JSON error answer


@dataclass
class Load:
    """Closed-loop clients, each sending its next request when the last is answered, in a
    thread of their own; every request is recorded. Bounded by `stop()` and `max_requests`."""

    url: str
    texts: list[str]
    concurrency: int
    per_request: int = 1
    retry_s: float = RETRY_S  # after a failed connection (0: at once, which may spin)
    max_requests: int = 200_000
    records: list[Record] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=lambda: uvloop.run(self._run()), daemon=True)

    def start(self) -> Load:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(90)

    async def _run(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(self.url, connector=connector, timeout=timeout) as session:
            await asyncio.gather(*(self._user(session, k) for k in range(self.concurrency)))

    async def _user(self, session: aiohttp.ClientSession, offset: int) -> None:
        i = offset
        while not self.stopping.is_set() and len(self.records) < self.max_requests:
            batch = [self.texts[(i + j) % len(self.texts)] for j in range(self.per_request)]
            start = time.monotonic()
            status, version, code = 0, "", ""
            try:
                async with session.post("/v1/classify", json={"texts": batch}, headers=HEADERS) as r:
                    body = await r.read()
                    status = r.status
                    if status == 200:
                        version = json.loads(body)["model_version"]
                    elif body.startswith(b"{"):
                        code = json.loads(body).get("error", {}).get("code", "")
            except (aiohttp.ClientError, TimeoutError):
                await asyncio.sleep(self.retry_s)  # a refused connection fails at once
            self.records.append(Record(start, time.monotonic(), status, version, code))
            i += self.concurrency


def _p99(records: list[Record]) -> float | None:
    ok = [(r.end - r.start) * 1000 for r in records if r.status == 200]
    return float(np.percentile(ok, 99)) if ok else None


def _median_ms(records: list[Record]) -> float | None:
    return float(np.median([(r.end - r.start) * 1000 for r in records])) if records else None


def summarize(name: str, records: list[Record], t0: float, t1: float, t2: float, t3: float) -> dict:
    """Windows: before [t0, t1), during [t1, t2) (the event until it played out), after [t2, t3)."""
    window = [r for r in records if t0 <= r.start < t3]
    during = [r for r in window if t1 <= r.start < t2]
    successes = sorted(r.end for r in window if r.status == 200 and r.end >= t1)
    gaps = np.diff([t1, *successes, t3]) if successes else [t3 - t1]
    return {
        "event": name,
        "sent": len(window),
        "failed": sum(r.status not in (200, 503) for r in window),
        "status_503": sum(r.status == 503 for r in window),
        "other_5xx": sum(r.status >= 500 and r.status != 503 for r in window),
        "no_answer": sum(r.status == 0 for r in window),
        "statuses": {str(k): v for k, v in sorted(Counter(r.status for r in window).items())},
        "codes_503": dict(Counter(r.code or "(not JSON)" for r in window if r.status == 503)),
        "ms_503_p50": _median_ms([r for r in window if r.status == 503]),
        "longest_gap_s": float(max(gaps)),
        "event_s": t2 - t1,
        "p99_ms_before": _p99([r for r in window if r.start < t1]),
        "p99_ms_during": _p99(during),
        "p99_ms_after": _p99([r for r in window if r.start >= t2]),
        "versions_after": sorted({r.version for r in window if r.start >= t2 and r.version}),
    }


class Service:
    """The running app: its config, `serve deploy` of a changed classifier user_config (on the
    Ingress in the fused topology, on the Classifier in the split one), and what GET /v1/model
    reports."""

    def __init__(self, url: str, config_path: Path) -> None:
        self.url, self.config_path = url, config_path
        self.config = yaml.safe_load(config_path.read_text())

    def deploy_classifier(self, **user_config: object) -> None:
        config = yaml.safe_load(yaml.safe_dump(self.config))
        classifier = classifier_deployment(config["applications"][0])
        classifier["user_config"] = {**classifier.get("user_config", {}), **user_config}
        path = self.config_path.with_name("deploy.yaml")
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        serve = installed_command("serve") or "serve"
        env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        harness.run_child([serve, "deploy", path], cwd=ROOT, env=env)

    def model(self) -> dict:
        try:
            return httpx.get(f"{self.url}/v1/model", headers=HEADERS, timeout=10).json()
        except (httpx.HTTPError, ValueError):
            return {}


def until(condition: Callable[[], bool], seconds: float = SETTLE_S) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False


def _pids(name: str) -> set[int]:
    return {pid for pid, process in serve_pids().items() if process == name}


def kill_one(name: str, every: bool = False) -> Callable[[Service, Load], None]:
    """SIGKILL one process of `name` (or every one: after a config reload HAProxy keeps its
    old process beside the new one for a while, so killing one of them may kill an idle one);
    played out when another has replaced it and answers."""

    def event(service: Service, load: Load) -> None:
        before = _pids(name)
        if not before:
            raise RuntimeError(f"no {name} process to kill")
        for pid in before if every else [min(before)]:
            os.kill(pid, signal.SIGKILL)
        mark = time.monotonic()
        until(lambda: len(_pids(name) - before) >= 1 and _answered_since(load, mark))

    return event


def proxy_process() -> str:
    """The HTTP proxy serving on this machine: HAProxy (Serve's fast data path) where it runs,
    else Ray's own ProxyActor."""
    return "HAProxy" if _pids("HAProxy") else "ProxyActor"


def _answered_since(load: Load, mark: float) -> bool:
    return any(r.status == 200 and r.start > mark for r in load.records[-50:])


def switch_refused(target: Path) -> Callable[[Service, Load], None]:
    def event(service: Service, load: Load) -> None:
        service.deploy_classifier(model=str(target), rollout=None)
        until(lambda: bool(service.model().get("switch_error")))

    return event


def canary_then_promote(primary: Path, second: Path) -> Callable[[Service, Load], None]:
    def event(service: Service, load: Load) -> None:
        service.deploy_classifier(model=str(primary), rollout={"model": str(second), "share": 0.1})
        mark = time.monotonic()
        spec = open_version(second).spec
        until(lambda: any(r.version == spec and r.start > mark for r in load.records[-400:]))
        service.deploy_classifier(model=str(second), rollout=None)
        mark = time.monotonic()
        until(lambda: _only(load, spec, mark))

    return event


def switch_to(target: Path) -> Callable[[Service, Load], None]:
    def event(service: Service, load: Load) -> None:
        service.deploy_classifier(model=str(target), rollout=None)
        mark, spec = time.monotonic(), open_version(target).spec
        until(lambda: _only(load, spec, mark))

    return event


def _only(load: Load, spec: str, mark: float) -> bool:
    recent = [r.version for r in load.records[-40:] if r.start > mark and r.status == 200]
    return len(recent) >= 20 and set(recent) == {spec}


@dataclass
class Overload:
    """A flood of 8-message requests from many clients, beside the steady load."""

    texts: list[str]
    concurrency: int
    seconds: float
    summary: dict | None = None

    def __call__(self, service: Service, load: Load) -> None:
        start = time.monotonic()
        flood = Load(service.url, self.texts, self.concurrency, per_request=8).start()
        time.sleep(self.seconds)
        flood.stop()
        end = time.monotonic()
        self.summary = summarize("flood", flood.records, start, start, end, end)


@dataclass
class Event:
    """One event of a topology's run: `kind` (what the targets know it by), its name in the
    table, what plays it, and the steady clients' retry delay while it plays."""

    kind: str
    name: str
    play: Callable[[Service, Load], None]
    retry_s: float = RETRY_S


def events(
    topology: Topology, proxy: str, versions: tuple[Path, Path, Path, Path], flood: Overload
) -> list[Event]:
    """The events played against a topology, in order. Killing the replica that holds the
    classifier is killing an Ingress replica in the fused topology: played once there."""
    v1, v2, corrupt, nan = versions
    holder = classifier_process(topology)
    # "a Classifier replica" in the split topology; "an Ingress replica" in the fused one.
    article = "an" if holder[0] in "AEIOU" else "a"
    name = f"kill {article} {holder} replica" + (" (it holds the classifier)" if holder == "Ingress" else "")
    killed = [Event("kill_classifier", name, kill_one(holder))]
    if holder != "Ingress":
        killed.append(Event("kill_ingress", "kill an Ingress replica", kill_one("Ingress")))
    return [
        *killed,
        *(
            Event("kill_proxy", f"kill {what}, clients retry {when}", kill_one(process, every=True), retry)
            for process, what in ((proxy, f"Serve's proxy ({proxy})"), (FRONT_DOOR, "the front door"))
            for retry, when in ((RETRY_S, f"after {RETRY_S * 1000:.0f} ms"), (0.0, "at once"))
        ),
        Event("switch_refused", "switch to a corrupted version", switch_refused(corrupt)),
        Event("switch_refused", "switch to a NaN version", switch_refused(nan)),
        Event("canary_promote", "10% canary, then promote it", canary_then_promote(v1, v2)),
        Event("rollback", "roll back", switch_to(v1)),
        Event(
            "overload",
            f"overload: {flood.concurrency} clients x 8 messages for {flood.seconds:.0f} s",
            flood,
        ),
    ]


def targets(topologies: dict[str, dict]) -> list[dict]:
    """Each target (issue #36) for each event it concerns, from the runs' summaries
    (`topologies`: topology → {"events": [...]}): the proxy's death costs at most PROXY_GAP_S
    without a success, by the clients' retry delay, and answers no 404; NO_FAILURES events fail
    no request."""
    rows = []
    for topology, run in topologies.items():
        for e in run["events"]:
            kind = e.get("kind")
            if kind == "kill_proxy":
                limit = PROXY_GAP_S.get(e["retry_s"])
                if limit is not None:
                    rows.append(_target(topology, e, f"longest gap ≤ {limit:g} s", e["longest_gap_s"], limit))
                rows.append(_target(topology, e, "no 404s", e["statuses"].get("404", 0), 0))
            elif kind in NO_FAILURES:
                rows.append(_target(topology, e, "0 failed requests", e["failed"], 0))
    return rows


def _target(topology: str, event: dict, target: str, value: float, limit: float) -> dict:
    return {
        "topology": topology,
        "event": event["event"],
        "target": target,
        "value": value,
        "limit": limit,
        "met": value <= limit,
    }


def train_versions(work: Path) -> list[Path]:
    versions = []
    for seed in (1, 2):
        overrides = {
            "output": str(work / "registry"),
            "name": "faults",
            "runtime.seed": seed,
            "training.epochs": 3,
            "runtime.progress": False,
        }
        # The demo's recipe, urgency and sentiment heads included: the default routing policy's
        # rules need them.
        cfg = load_config(Path(__file__).parents[1] / "configs" / "sample.yaml", overrides)
        versions.append(train_and_register(cfg).path)
    return versions


def bad_versions(good: Path) -> tuple[Path, Path]:
    """A copy with one flipped byte (its manifest no longer matches), and a sealed version
    whose head gives NaN (it passes the manifest and fails the forward-pass check)."""
    corrupt = good.with_name("v90")  # named as a version, so that the switch is asked for
    shutil.rmtree(corrupt, ignore_errors=True)
    shutil.copytree(good, corrupt)
    head = bytearray((corrupt / "head.safetensors").read_bytes())
    head[-1] ^= 0x01
    (corrupt / "head.safetensors").write_bytes(bytes(head))
    model = IntentModel.from_pretrained(good)
    with torch.no_grad():
        model.network.head.weight.fill_(float("nan"))
    version = open_version(good)
    with Registry(good.parent.parent).draft(version.name) as draft:
        nan = draft.publish(model, version.config, version.meta, {}).path
    return corrupt, nan


def run_topology(
    topology: Topology, args: argparse.Namespace, versions: tuple[Path, Path, Path, Path], texts: list[str]
) -> dict:
    """Start the service in this topology, play every event against it under the steady load,
    stop it: {"proxy", "events", "flood"}."""
    print(f"== starting the service: {topology} topology", flush=True)
    log = args.work / f"serve-{topology}.log"
    proc, config_path = start_serve(str(versions[0]), args.port, log, {"topology": topology})
    url = f"http://127.0.0.1:{args.port}"
    service = Service(url, config_path)
    flood = Overload(texts, args.flood, args.flood_seconds)
    proxy = proxy_process()
    load = Load(url, texts, args.steady).start()
    results = []
    try:
        time.sleep(WINDOW_S)  # warm-up
        for event in events(topology, proxy, versions, flood):
            print(f"== {topology}: {event.name}", flush=True)
            if event.retry_s != load.retry_s:  # other clients for this event, from its window on
                load.stop()
                max_requests = 1_000_000 if event.retry_s == 0 else Load.max_requests
                load = Load(url, texts, args.steady, retry_s=event.retry_s, max_requests=max_requests).start()
            t0 = time.monotonic()
            time.sleep(WINDOW_S)
            t1 = time.monotonic()
            event.play(service, load)
            t2 = time.monotonic()
            time.sleep(WINDOW_S)
            summary = summarize(event.name, load.records, t0, t1, t2, time.monotonic())
            results.append({**summary, "kind": event.kind, "topology": topology, "retry_s": event.retry_s})
            print(json.dumps(results[-1]), flush=True)
    finally:
        load.stop()
        harness.stop(proc, log=log)
    return {"proxy": proxy, "events": results, "flood": flood.summary}


def main() -> None:
    parser = harness.parser(__doc__, work="faults")
    parser.add_argument(
        "--topologies",
        nargs="+",
        choices=list(DEPLOYMENTS),
        default=list(DEPLOYMENTS),
        help="the topologies to fault, each started in turn [default: fused split]",
    )
    parser.add_argument("--port", type=int, default=8124)
    parser.add_argument("--steady", type=int, default=4, help="steady-load clients [default: 4]")
    parser.add_argument(
        "--flood", type=int, default=160, help="overload clients, 8 messages each [default: 160]"
    )
    parser.add_argument("--flood-seconds", type=float, default=20)
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    print("== training two versions", flush=True)
    v1, v2 = train_versions(args.work)
    corrupt, nan = bad_versions(v1)
    texts = messages()
    runs = {t: run_topology(t, args, (v1, v2, corrupt, nan), texts) for t in args.topologies}
    checked = targets(runs)
    for row in checked:
        print(
            f"target {row['topology']}, {row['event']}: {row['target']}: {row['value']} "
            f"{'met' if row['met'] else 'NOT MET'}",
            flush=True,
        )
    result = {
        "machine": harness.machine(note="proxy " + ", ".join(sorted({r["proxy"] for r in runs.values()}))),
        "steady_concurrency": args.steady,
        "flood_concurrency": args.flood,
        "retry_s": RETRY_S,
        "topologies": runs,
        "targets": checked,
    }
    harness.save("serve_faults", result, args.results, args.tag)


if __name__ == "__main__":
    main()
