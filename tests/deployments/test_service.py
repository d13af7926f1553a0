"""The Serve application over real HTTP: classify, route, errors, auth, policy reload, a
fuzz run against its OpenAPI schema, model switch, replica failure. One `serve run` for all
(conftest.service); the tests that disturb the service come last."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import TOY_INTENTS
from tests.deployments.conftest import KEYS, Service, write_policy

pytestmark = pytest.mark.integration

TRACK, RESET = "where is my parcel", "forgot my password"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def test_classify_one_and_many(service: Service) -> None:
    with service.client() as client:
        one = client.post("/v1/classify", json={"text": TRACK})
        many = client.post("/v1/classify", json={"texts": [TRACK, RESET, TRACK], "top_k": 1})
    assert one.status_code == 200, one.text
    body = one.json()
    assert body["results"][0]["intent"] == "track_order"
    assert body["model_version"] == "toy/v1"
    assert body["request_id"] == one.headers["x-request-id"]
    assert len(body["results"][0]["alternatives"]) == 2  # top_k 3 by default, but 3 intents
    results = many.json()["results"]
    assert [r["intent"] for r in results] == ["track_order", "reset_password", "track_order"]
    assert all(len(r["alternatives"]) == 1 for r in results)
    assert results[0]["confidence"] == pytest.approx(body["results"][0]["confidence"], abs=1e-4)


def test_route_follows_the_policy(service: Service) -> None:
    with service.client() as client:
        response = client.post("/v1/route", json={"texts": [TRACK, RESET]})
        info = client.get("/v1/model").json()
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["policy_version"] == info["policy_version"] == "test-1"
    track, reset = body["decisions"]
    assert (track["intent"], track["destination"], track["priority"]) == (
        "track_order",
        "track_order-queue",
        "high",
    )
    assert reset["destination"] == "reset_password-queue"
    assert not track["handoff"] and track["reason"] == "intent"
    assert sorted(info["labels"]) == sorted(TOY_INTENTS)
    assert "path" not in info  # no server internals in responses


def test_request_id_is_echoed(service: Service) -> None:
    with service.client() as client:
        response = client.post("/v1/classify", json={"text": TRACK}, headers={"X-Request-ID": "call-42"})
    assert response.headers["x-request-id"] == "call-42"
    assert response.json()["request_id"] == "call-42"


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"text": ""}, 422, "text"),
        ({"texts": ["ok", "   "]}, 422, "texts.1"),
        ({"text": "x" * 1001}, 413, "text"),
        ({"texts": ["hi"] * 65}, 422, "texts"),
        ({"texts": []}, 422, "texts"),
        ({"text": "a", "texts": ["b"]}, 422, None),
        ({}, 422, None),
        ({"text": 5}, 422, "text"),
        ({"text": "hi", "top_k": 99}, 422, "top_k"),
        ({"text": "hi", "surprise": 1}, 422, "surprise"),
    ],
)
def test_bad_input_gets_a_json_error_naming_the_field(
    service: Service, body: dict, status: int, field
) -> None:
    with service.client() as client:
        response = client.post("/v1/route", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"] == field
    assert error["message"] and "Traceback" not in response.text
    if len(str(body.get("text", ""))) > 100:
        assert body["text"] not in response.text  # customer text is never echoed


def test_oversized_and_malformed_bodies(service: Service) -> None:
    with service.client() as client:
        huge = client.post("/v1/classify", content=b'{"text": "' + b"a" * 300_000 + b'"}')
        broken = client.post(
            "/v1/classify", content=b'{"text": ', headers={"Content-Type": "application/json"}
        )
        missing = client.get("/v1/nothing")
    assert huge.status_code == 413 and huge.json()["error"]["field"] == "body"
    assert broken.status_code == 422 and broken.json()["error"]["field"] == "body"
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "http_error"


@pytest.mark.parametrize("key", [None, "wrong-key", KEYS[0][:-1]])
def test_requests_without_a_valid_key_are_refused(service: Service, key: str | None) -> None:
    with service.client(key) as client:
        for response in (client.post("/v1/classify", json={"text": TRACK}), client.get("/v1/model")):
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["error"]["code"] == "unauthorized"


def test_every_configured_key_works_and_health_needs_none(service: Service) -> None:
    for key in KEYS:
        with service.client(key) as client:
            assert client.post("/v1/classify", json={"text": TRACK}).status_code == 200
    assert httpx.get(f"{service.url}/healthz").json() == {"status": "ok"}


def test_auth_can_be_disabled_explicitly(service: Service) -> None:
    with service.client(key=None, prefix="/open") as client:
        response = client.post("/v1/route", json={"text": RESET})
    assert response.status_code == 200, response.text
    assert response.json()["decisions"][0]["intent"] == "reset_password"


def test_policy_reloads_without_restart(service: Service) -> None:
    write_policy(service.policy, min_confidence=1.0, version="test-2")
    try:
        deadline = time.monotonic() + 30
        with service.client() as client:
            while time.monotonic() < deadline:
                body = client.post("/v1/route", json={"text": TRACK}).json()
                if body["policy_version"] == "test-2":
                    break
                time.sleep(1)
        decision = body["decisions"][0]
        assert body["policy_version"] == "test-2"
        assert decision["handoff"] and decision["reason"] == "low_confidence"
        assert decision["destination"] == "human-agents"
    finally:
        write_policy(service.policy)


def test_bad_policy_edit_keeps_the_last_good_policy(service: Service) -> None:
    service.policy.write_text(yaml.safe_dump({"version": "broken", "routes": {"no_such_intent": {}}}))
    try:
        time.sleep(3)  # past the router's look-again interval
        with service.client() as client:
            response = client.post("/v1/route", json={"text": TRACK})
        assert response.status_code == 200
        assert response.json()["policy_version"] != "broken"
    finally:
        write_policy(service.policy)


def test_no_server_error_and_no_schema_violation(service: Service) -> None:
    # schemathesis' pytest plugin does not load under pytest 9; drive hypothesis directly.
    schema = schemathesis.openapi.from_url(f"{service.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/classify", "POST /v1/route", "GET /v1/model"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def fuzz(case: schemathesis.Case) -> None:
            case.call_and_validate(headers={"Authorization": f"Bearer {KEYS[0]}"}, checks=CHECKS)

        fuzz()


def _ray_metrics(service: Service) -> list[tuple[str, dict[str, str], float]]:
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


def test_request_and_batch_metrics_are_exported(service: Service) -> None:
    with service.client() as client:
        version = client.post("/v1/classify", json={"text": "where is my parcel"}).json()["model_version"]
    ingress = {"deployment": "Ingress", "route": "/v1/classify", "model_version": version}
    wanted = {
        "ray_transferdesk_requests_total": {**ingress, "status": "200"},
        "ray_transferdesk_request_latency_ms_count": ingress,
        "ray_transferdesk_batch_size_count": {"deployment": "Classifier", "model_version": version},
    }

    def found() -> set[str]:
        hits = set()
        for name, labels, value in _ray_metrics(service):
            if name in wanted and value > 0 and labels.items() >= wanted[name].items():
                hits.add(name)
        return hits

    deadline = time.monotonic() + 90  # Ray exports metrics every few seconds
    while found() != set(wanted) and time.monotonic() < deadline:
        time.sleep(3)
    assert found() == set(wanted)


def _hammer(service: Service, stop: threading.Event, outcomes: list) -> None:
    with service.client() as client:
        while not stop.is_set():
            try:
                r = client.post("/v1/classify", json={"texts": [TRACK, RESET]})
                outcomes.append((r.status_code, r.json().get("model_version")))
            except httpx.HTTPError as err:
                outcomes.append((type(err).__name__, None))


def _classifier_pids() -> set[int]:
    """Processes of classifier replicas, found by their Ray process title."""
    pids = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if b"ServeReplica:transferdesk:Classifier" in (proc / "cmdline").read_bytes():
                pids.add(int(proc.name))
        except OSError:  # gone meanwhile
            continue
    return pids


def test_model_switch_under_load_loses_no_request(service: Service) -> None:
    config = yaml.safe_load(yaml.safe_dump(service.config))
    classifier = next(d for d in config["applications"][0]["deployments"] if d["name"] == "Classifier")
    classifier["user_config"]["model"] = str(service.versions[1])
    pids = _classifier_pids()
    stop, outcomes = threading.Event(), []
    workers = [threading.Thread(target=_hammer, args=(service, stop, outcomes)) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(2)
        service.deploy(config)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(v == "toy/v2" for _, v in outcomes[-20:]):
            time.sleep(1)
        time.sleep(2)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    statuses = {s for s, _ in outcomes}
    versions = [v for _, v in outcomes]
    assert statuses == {200}, f"failed requests during the switch: {statuses}"
    assert "toy/v1" in versions and versions[-1] == "toy/v2"
    assert _classifier_pids() == pids  # switched in place: no replica restarted
    with service.client() as client:
        info = client.get("/v1/model").json()
    assert info["version"] == "toy/v2" and info["switch_error"] is None


def test_killed_classifier_replica_is_replaced(service: Service) -> None:
    before = _classifier_pids()
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 180
    answered = 0
    with service.client() as client:
        while time.monotonic() < deadline:
            try:
                ok = client.post("/v1/classify", json={"text": TRACK}).status_code == 200
            except httpx.HTTPError:
                ok = False
            answered += ok
            now = _classifier_pids()
            if victim not in now and len(now) >= len(before) and answered >= 5:
                break
            time.sleep(1)
        final = client.post("/v1/classify", json={"text": TRACK})
    assert victim not in _classifier_pids()
    assert len(_classifier_pids()) >= len(before), "the killed replica was not replaced"
    assert final.status_code == 200
