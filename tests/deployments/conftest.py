"""One real `serve run` for the Serve tests of this folder, behind the front door as `transferdesk
serve` runs it (an app takes a minute to come up on 2 cores; started once, and gone before the
tuning tests start Ray): two registry versions of the tiny model, and three applications: /,
with API keys, and /open, with auth explicitly disabled, both of deployments/serve-split.yaml
(four deployments); and /fused, the same settings as / in the fused topology of
deployments/serve.yaml. Tests add applications of their own to it (test_chinese)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from deployments.cli import SERVE_YAMLS
from deployments.config import Topology, serve_env
from deployments.front import FrontDoor, free_port
from deployments.processes import installed_command, sigint_default
from tests.conftest import TOY_INTENTS, Postgres, tiny_run, toy_rows, write_csv
from transferdesk.training.train import train_and_register

KEYS = ("test-key-number-one", "test-key-number-two")  # 16 characters at least
START_TIMEOUT_S = 300
ROOT = Path(__file__).resolve().parents[2]
SERVE = installed_command("serve")
# A throwaway cluster on loopback: without Ray's token auth, `serve deploy` needs no token file.
# Ray keeps a stopping Ingress replica for 30 s, for load balancers that send requests to
# replicas directly to forget it; nothing here does (the front door sends them to Serve's
# HAProxy), and the wait made every shutdown of a test service run into its 30 s limit.
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


def isolated_env(ray_tmp: Path) -> dict[str, str]:
    """Ray's and HAProxy's files and side ports of their own, so this cluster does not clash
    with another Serve on the machine (HAProxy's defaults are fixed paths under /tmp and ports)."""
    # Short names: Ray puts a node id (56 characters) into each path, and HAProxy allows 97.
    return {
        "RAY_TMPDIR": str(ray_tmp),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(ray_tmp / "h.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(ray_tmp / "a.sock"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(ray_tmp / "m.sock"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
    }


def write_policy(path: Path, min_confidence: float = 0.0, version: str = "test-1", **more: object) -> Path:
    """The toy versions' policy; `more`: other settings (rules, priority_from)."""
    routes = {intent: {"destination": f"{intent}-queue", "priority": "normal"} for intent in TOY_INTENTS}
    policy = {
        "version": version,
        "min_confidence": min_confidence,
        "fallback": {"destination": "human-agents"},
        "routes": routes,
        **more,
    }
    path.write_text(yaml.safe_dump(policy))
    return path


@dataclass
class Service:
    url: str
    config: dict
    config_path: Path
    dashboard: str
    policy: Path
    versions: list[Path]
    log: Path
    ray_tmp: Path  # this cluster's RAY_TMPDIR: its session files, metrics targets among them
    keys_file: Path  # TRANSFERDESK_API_KEYS_FILE: keys beside those of the environment
    store: str  # the capture store of the / app (PostgreSQL)
    front: FrontDoor  # what the url reaches: deployments/front.py

    def client(self, key: str | None = KEYS[0], prefix: str = "") -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url + prefix, headers=headers, timeout=60)

    def deploy(self, config: dict) -> None:
        """`serve deploy` a changed config to the running cluster, as an operator would."""
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        subprocess.run(
            [SERVE, "deploy", str(self.config_path), "--address", self.dashboard],
            check=True,
            cwd=ROOT,
            env={**os.environ, **RAY_ENV},
        )


def ray_metrics(service: Service) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) from every metrics endpoint of the service's Ray cluster."""
    discovery = service.ray_tmp / "ray" / "session_latest" / "prom_metrics_service_discovery.json"
    if not discovery.is_file():  # not written yet
        return []
    samples = []
    for target in (t for group in json.loads(discovery.read_text()) for t in group["targets"]):
        try:
            text = httpx.get(f"http://{target}/metrics", timeout=10).text
        except httpx.HTTPError:
            continue
        for match in re.finditer(r"^(ray_transferdesk_\w+)\{(.*)\} (\S+)$", text, re.MULTILINE):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
            samples.append((match.group(1), labels, float(match.group(3))))
    return samples


# The toy versions' second head: how urgent each toy intent's messages are.
TOY_URGENCY = {"track_order": "normal", "reset_password": "normal", "refund_status": "urgent"}


def _with_urgency(rows: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    return [(text, label, TOY_URGENCY.get(label, "normal")) for text, label in rows]


def train_versions(tmp: Path, backbone: Path) -> list[Path]:
    """Two versions of a toy model with two heads: intent and urgency."""
    header = ("text", "label", "urgency")
    files = {
        "train": write_csv(tmp / "train.csv", _with_urgency(toy_rows(0, 6)), header),
        "valid": write_csv(
            tmp / "valid.csv", _with_urgency([*toy_rows(6, 8), ("weather on mars", "oos")]), header
        ),
    }
    versions = []
    for seed in (1, 2):  # two versions of one model, with different weights
        overrides = {
            "name": "toy",
            "runtime.seed": seed,
            "training.epochs": 15,
            "model.dropout": 0.1,
            "data.tasks": ["urgency"],
            # Seven validation rows of a tiny random encoder: its energy says little, and these
            # tests need the toy's in-scope messages in scope (the score has tests of its own).
            "calibration.score": "softmax",
            "calibration.multi_intent_rows": 50,  # the /open app looks for two requests a message
        }
        cfg = tiny_run(backbone, files, tmp / "registry", **overrides)
        versions.append(train_and_register(cfg).path)
    return versions


PREFIXES = ("", "/open", "/fused")  # the service's applications, by route prefix
# Where the /open app captures to: nothing listens on port 1, so its capture starts degraded.
UNREACHABLE_STORE = "postgresql+psycopg://transferdesk@127.0.0.1:1/nothing"


def app_config(version: Path, policy: Path, port: int, topology: Topology = "fused") -> dict:
    """The topology's serve.yaml serving `version` on localhost, with small CPU shares and one
    replica each."""
    config = yaml.safe_load(SERVE_YAMLS[topology].read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    app = config["applications"][0]
    app["args"].update(model=str(version), routing_policy=str(policy))
    for deployment in app["deployments"]:
        deployment["ray_actor_options"] = {"num_cpus": 0.1}
        deployment["autoscaling_config"]["min_replicas"] = 1
    return config


def _config(versions: list[Path], policy: Path, port: int, stores: tuple[str, str]) -> dict:
    """serve-split.yaml with the tiny model, small CPU shares (2 cores hold the three apps), an
    /open copy of the app without auth, and a /fused one in the fused topology. Capture is on:
    / writes every message to stores[0] (sample_rate 1: a message not handed off is captured as
    a sample), /fused to stores[1], /open to an unreachable store."""
    config = app_config(versions[0], policy, port, "split")
    app = config["applications"][0]
    app["args"]["limits"]["body_timeout_s"] = 3.0  # slow-body tests wait this long
    capture = {"enabled": True, "store": stores[0], "sample_rate": 1.0, "flush_interval_s": 0.2}
    app["args"]["capture"] = capture
    classifier = next(d for d in app["deployments"] if d["name"] == "Classifier")
    classifier["autoscaling_config"]["min_replicas"] = 2  # one may be killed by a test
    open_app = yaml.safe_load(yaml.safe_dump(app))
    open_app.update(name="open", route_prefix="/open")
    open_app["args"]["auth"] = {"disabled": True}
    open_app["args"]["docs"] = {"exposure": "off"}
    open_app["args"]["capture"]["store"] = UNREACHABLE_STORE
    open_app["args"]["multi_intent"] = {"enabled": True}
    for deployment in open_app["deployments"]:
        deployment["autoscaling_config"].update(min_replicas=1, max_replicas=1)
    fused = app_config(versions[0], policy, port)["applications"][0]
    fused.update(name="fused", route_prefix="/fused")
    fused["args"] = {**app["args"], "topology": "fused", "capture": {**capture, "store": stores[1]}}
    (ingress,) = fused["deployments"]
    ingress["autoscaling_config"]["max_replicas"] = 1  # its pid stays through a switch (a test)
    config["applications"] = [app, open_app, fused]
    return config


def wait_until_up(url: str, proc: subprocess.Popen, log: Path, prefixes: tuple[str, ...] = PREFIXES) -> None:
    """Until every application (by route prefix) answers /readyz, or fail with the log's end."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"serve run exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if all(_ready(f"{url}{p}") for p in prefixes):
            return
        time.sleep(2)
    pytest.fail(f"the Serve app did not come up in {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def wait_until_ready(url: str, timeout_s: float = START_TIMEOUT_S) -> None:
    """Until the application at `url` (one deployed to a running cluster) answers /readyz."""
    deadline = time.monotonic() + timeout_s
    while not _ready(url):
        if time.monotonic() > deadline:
            pytest.fail(f"{url} was not ready in {timeout_s} s")
        time.sleep(1)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def serve_running(
    config: dict, tmp: Path, env: dict[str, str], prefixes: tuple[str, ...] = PREFIXES
) -> Iterator[tuple[str, Path, Path, str, FrontDoor]]:
    """`serve run` of `config` (written to tmp/serve.yaml), on a Ray of its own, behind a front
    door, until the block ends: (url, log, Ray's temp directory, dashboard address, front door)."""
    if SERVE is None:
        pytest.fail("Ray Serve's `serve` command is not installed")
    # Short, under /tmp: Ray's socket paths inside it must stay under 108 bytes.
    ray_tmp = Path(tempfile.mkdtemp(prefix="td-ray-", dir="/tmp"))
    env = {**serve_env(), **RAY_ENV, **isolated_env(ray_tmp), **env}
    front = FrontDoor.claim(config, env)  # as `transferdesk serve` runs it: requests go through it
    config_path = tmp / "serve.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log = tmp / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [SERVE, "run", str(config_path)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=sigint_default,
        )
    url = f"http://127.0.0.1:{front.port}"
    try:
        with front:
            wait_until_up(url, proc, log, prefixes)
            # Colour codes stripped (their digits defeat the pattern): a guessed 8265 would send
            # `serve deploy` to whichever cluster holds it, another's when two Serves share a machine.
            plain = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text())
            match = re.search(r"dashboard at http://(\d+\.\d+\.\d+\.\d+:\d+)", plain)
            if match is None:
                pytest.fail(f"no dashboard address in the log of serve run:\n{plain[-3000:]}")
            yield url, log, ray_tmp, f"http://{match.group(1)}", front
    finally:
        proc.send_signal(signal.SIGINT)  # serve run shuts the app and its local Ray down
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests of this folder that use the shared service run after its others, together, so
    that it starts once and is gone before the next folder's tests (Tune's Ray among them)."""
    here = [i for i, item in enumerate(items) if Path(item.path).is_relative_to(Path(__file__).parent)]
    if here:
        block = items[here[0] : here[-1] + 1]
        block.sort(key=lambda item: "service" in item.fixturenames)
        items[here[0] : here[-1] + 1] = block


# Per package, not per session: Tune's tests, which start a Ray of their own, come after.
@pytest.fixture(scope="package")
def service(
    tmp_path_factory: pytest.TempPathFactory, tiny_backbone: Path, postgres: Postgres
) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("serve")
    versions = train_versions(tmp, tiny_backbone)
    policy = write_policy(tmp / "policy.yaml")
    store = postgres.new_database()
    config = _config(versions, policy, free_port(), (store, postgres.new_database()))
    keys_file = tmp / "keys"  # a mounted Secret's stand-in: rotated by a test
    keys_file.write_text("")
    env = {"TRANSFERDESK_API_KEYS": ",".join(KEYS), "TRANSFERDESK_API_KEYS_FILE": str(keys_file)}
    with serve_running(config, tmp, env) as (url, log, ray_tmp, dashboard, front):
        config_path = tmp / "serve.yaml"
        yield Service(
            url, config, config_path, dashboard, policy, versions, log, ray_tmp, keys_file, store, front
        )
