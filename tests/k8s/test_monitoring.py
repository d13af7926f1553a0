"""The drift alerts and dashboard of k8s/components/monitoring: in production alone (a cluster
without the Prometheus operator has no such kinds), thresholds that are the application's
args.drift, expressions over metrics the service exports under the names Ray gives them, and,
where promtool is installed, rules Prometheus loads that fire on drift and not on noise."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deployments.alerts import REQUESTS, alert_rules
from deployments.config import DriftSettings, ServeArgs
from deployments.drift import GAUGES
from tests.k8s.test_manifests import MONITORING_API, TARGETS, one
from tests.k8s.test_serve_config import render, serve_yaml

# Ray's names for what the service exports: gauges as named, counters with _total, histograms
# with _bucket (tests/deployments/test_service.py reads them off a live service).
EXPORTED = {f"ray_{name}" for name in GAUGES.values()} | {
    REQUESTS,
    "ray_transferdesk_request_latency_ms_bucket",
}
DURATION = re.compile(r"^([0-9]+(ms|[smhdwy]))+$")  # Prometheus's duration syntax


def _shipped_drift() -> DriftSettings:
    (app,) = serve_yaml()["applications"]
    return ServeArgs.model_validate(app["args"]).drift


def _rules(docs: list[dict]) -> list[dict]:
    return [r for g in one(docs, "PrometheusRule")["spec"]["groups"] for r in g["rules"]]


@pytest.mark.parametrize("target", TARGETS)
def test_monitoring_ships_with_production_only(rendered: dict, target: str) -> None:
    kinds = {d["kind"] for d in rendered[target] if d["apiVersion"] == MONITORING_API}
    assert kinds == ({"PrometheusRule", "PodMonitor"} if target == "overlays/production" else set())


def test_the_rules_are_the_rendering_of_args_drift(rendered: dict) -> None:
    rules = _rules(rendered["overlays/production"])
    drift = _shipped_drift()
    assert drift == DriftSettings()  # serve.yaml keeps the defaults, documented as shipped
    assert rules == alert_rules(drift)
    thresholds = {
        "TransferDeskIntentMixDrift": ("> ", drift.divergence_alert),
        "TransferDeskHandoffRateHigh": ("> ", drift.handoff_rate_alert),
        "TransferDeskOutOfScopeRateHigh": ("> ", drift.out_of_scope_rate_alert),
        "TransferDeskConfidenceLow": ("< ", drift.mean_confidence_alert),
    }
    assert {r["alert"] for r in rules} == set(thresholds)
    for rule in rules:
        comparison, value = thresholds[rule["alert"]]
        assert f"{comparison}{value})" in rule["expr"], rule["alert"]
        assert DURATION.match(rule["for"]) and rule["for"] == f"{drift.alert_for_minutes}m"
        metrics = set(re.findall(r"\bray_\w+", rule["expr"]))
        assert metrics <= EXPORTED and REQUESTS in metrics, rule["alert"]  # only versions answering


def test_a_target_may_not_change_the_shared_alerts() -> None:
    targets = yaml.safe_load(render.TARGETS_YAML.read_text())
    targets["targets"]["production"]["args"]["drift"] = {"divergence_alert": 0.5}
    with pytest.raises(ValueError, match=r"args\.drift sets the alerts every target shares"):
        render.rendered(targets=targets)


def test_the_dashboard_is_provisioned_for_grafanas_sidecar(rendered: dict) -> None:
    config = one(rendered["overlays/production"], "ConfigMap", "transferdesk-dashboard")
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1"
    board = json.loads(config["data"]["transferdesk.json"])
    exprs = [t["expr"] for panel in board["panels"] for t in panel["targets"]]
    assert set(re.findall(r"\bray_\w+", " ".join(exprs))) == EXPORTED  # drift beside traffic and latency
    assert len({panel["id"] for panel in board["panels"]}) == len(board["panels"])


def _promtool() -> str:
    found = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if not found:
        pytest.skip("promtool not found (Debian's `prometheus` package; or set PROMTOOL)")
    return found


def _rule_file(rendered: dict, tmp_path: Path) -> Path:
    groups = one(rendered["overlays/production"], "PrometheusRule")["spec"]["groups"]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    return path


def test_prometheus_loads_the_rules(rendered: dict, tmp_path: Path) -> None:
    result = subprocess.run(
        [_promtool(), "check", "rules", str(_rule_file(rendered, tmp_path))], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_drift_alert_fires_on_drift_and_not_on_noise(rendered: dict, tmp_path: Path) -> None:
    """Two Ingress replicas of a version taking traffic: its divergence over the threshold for
    the alert's `for` fires it; under it (or a version no longer answering) does not."""
    drift = _shipped_drift()
    minutes = 2 * drift.alert_for_minutes + 5
    labels = 'namespace="transferdesk", model_version="{version}", replica="{replica}"'

    def series(name: str, version: str, values: str) -> list[dict]:
        return [
            {"series": f"{name}{{{labels.format(version=version, replica=r)}}}", "values": values}
            for r in "ab"
        ]

    high, low = drift.divergence_alert * 1.2, drift.divergence_alert * 0.8
    [rule] = [r for r in alert_rules(drift) if r["alert"] == "TransferDeskIntentMixDrift"]
    annotations = {  # as Prometheus expands them
        key: text.replace("{{ $labels.model_version }}", "drifted/v1").replace(
            '{{ $value | printf "%.3f" }}', f"{high:.3f}"
        )
        for key, text in rule["annotations"].items()
    }
    tests = {
        "rule_files": [str(_rule_file(rendered, tmp_path))],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    *series("ray_transferdesk_intent_divergence", "drifted/v1", f"{high}x{minutes}"),
                    *series(REQUESTS, "drifted/v1", f"0+60x{minutes}"),
                    *series("ray_transferdesk_intent_divergence", "steady/v1", f"{low}x{minutes}"),
                    *series(REQUESTS, "steady/v1", f"0+60x{minutes}"),
                    # switched away from: its gauge stays, its traffic stopped
                    *series("ray_transferdesk_intent_divergence", "retired/v1", f"{high}x{minutes}"),
                    *series(REQUESTS, "retired/v1", f"100x{minutes}"),
                ],
                "alert_rule_test": [
                    {
                        "eval_time": f"{drift.alert_for_minutes - 2}m",
                        "alertname": "TransferDeskIntentMixDrift",
                    },
                    {
                        "eval_time": f"{drift.alert_for_minutes + 2}m",
                        "alertname": "TransferDeskIntentMixDrift",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "namespace": "transferdesk",
                                    "model_version": "drifted/v1",
                                    "severity": "warning",
                                },
                                "exp_annotations": annotations,
                            }
                        ],
                    },
                ],
            }
        ],
    }
    path = tmp_path / "tests.yaml"
    path.write_text(yaml.safe_dump(tests))
    result = subprocess.run([_promtool(), "test", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
