"""Serve on a two-node Ray cluster on localhost (a head, and a second `ray start --address`
node): the node holding one Classifier replica is stopped under load, and the service keeps
answering from the other."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from deployments.cli import SERVE_YAMLS
from deployments.config import serve_env
from deployments.processes import installed_command
from tests.deployments.conftest import KEYS, RAY_ENV, free_port, isolated_env, train_versions, write_policy

pytestmark = pytest.mark.integration
RAY = installed_command("ray")
SERVE = installed_command("serve")


def _raylets() -> dict[int, str]:
    """Raylet processes on this machine, by pid: their command lines name their node."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "/raylet " in cmdline or cmdline.split(" ")[0].endswith("/raylet"):
            found[int(proc.name)] = cmdline
    return found


def _classifier_replicas() -> dict[int, int]:
    """Classifier replica pid → the pid of the raylet (node) it runs under."""
    replicas = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if b"ServeReplica:transferdesk:Classifier" not in (proc / "cmdline").read_bytes():
                continue
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            replicas[int(proc.name)] = int(stat[1])  # parent: the raylet that started the worker
        except OSError:
            continue
    return replicas


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[dict[str, str]]:
    if RAY is None or SERVE is None:
        pytest.fail("Ray's `ray` and `serve` commands are not installed")
    ray_tmp = Path(tempfile.mkdtemp(prefix="td-2n-", dir="/tmp"))
    env = {**serve_env(), **RAY_ENV, **isolated_env(ray_tmp), "TRANSFERDESK_API_KEYS": ",".join(KEYS)}
    gcs, dashboard = free_port(), free_port()
    head = [
        RAY,
        "start",
        "--head",
        f"--port={gcs}",
        "--num-cpus=2",
        f"--temp-dir={ray_tmp}",
        '--resources={"head": 10}',
    ]
    head += ["--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true"]
    try:
        subprocess.run(head, check=True, env=env, capture_output=True, timeout=180)
        before = set(_raylets())
        second = [RAY, "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=1"]
        subprocess.run(second, check=True, env=env, capture_output=True, timeout=180)
        (node,) = set(_raylets()) - before
        yield {"env": env, "dashboard": f"http://127.0.0.1:{dashboard}", "second": str(node)}
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_losing_a_node_under_load_keeps_the_service_answering(
    cluster: dict, tmp_path: Path, tiny_backbone: Path
) -> None:
    versions = train_versions(tmp_path, tiny_backbone)
    config = yaml.safe_load(SERVE_YAMLS["split"].read_text())  # a Classifier deployment to lose
    port = free_port()
    config["proxy_location"] = "HeadOnly"  # one HTTP port on this one machine
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    app = config["applications"][0]
    app["args"].update(model=str(versions[0]), routing_policy=str(write_policy(tmp_path / "policy.yaml")))
    for deployment in app["deployments"]:  # all but the Classifier on the head, which stays
        deployment["ray_actor_options"] = {"num_cpus": 0.1, "resources": {"head": 1}}
        deployment["autoscaling_config"].update(min_replicas=1, max_replicas=1)
    classifier = next(d for d in app["deployments"] if d["name"] == "Classifier")
    classifier["autoscaling_config"].update(min_replicas=2, max_replicas=2)
    classifier["ray_actor_options"] = {"num_cpus": 0.1}
    classifier["max_replicas_per_node"] = 1  # so one replica is on each node
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    subprocess.run(
        [SERVE, "deploy", str(path), "--address", cluster["dashboard"]],
        check=True,
        env=cluster["env"],
        capture_output=True,
        timeout=120,
    )
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {KEYS[0]}"}
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200 and len(_classifier_replicas()) == 2:
                break
        except httpx.HTTPError:
            pass
        time.sleep(2)
    replicas = _classifier_replicas()
    assert sorted(replicas.values()).count(int(cluster["second"])) == 1, replicas  # one on each node

    stop, outcomes = threading.Event(), []

    def hammer() -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
            while not stop.is_set():
                try:
                    outcomes.append(
                        client.post("/v1/classify", json={"text": "where is my parcel"}).status_code
                    )
                except httpx.HTTPError:
                    outcomes.append(0)

    workers = [threading.Thread(target=hammer) for _ in range(3)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(3)
        before = len(outcomes)
        # Stop the second node: its raylet, and with it the Classifier replica it runs.
        victims = [pid for pid, raylet in replicas.items() if raylet == int(cluster["second"])]
        os.kill(int(cluster["second"]), signal.SIGKILL)
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        time.sleep(10)  # hundreds of requests at the toy model's pace
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    after = outcomes[before:]
    assert after.count(200) > 50, f"{len(after)} requests, {after.count(200)} answered"
    assert after[-20:] == [200] * 20  # answering from the head's replica, the lost one not back
    assert after.count(200) / len(after) > 0.95, sorted(set(after))
