"""What Prometheus and Grafana are given to watch the service (k8s/components/monitoring,
written by k8s/render.py): the alert rules of a `PrometheusRule`, their thresholds those of
`args.drift` (DriftSettings), and a Grafana dashboard of the drift figures beside traffic,
errors and latency. Metric names are as Ray exports them: `ray_` before the name the code
gives, `_total` after a counter's, `_bucket` after a histogram's.
"""

from __future__ import annotations

from deployments.config import DriftSettings
from deployments.drift import GAUGES

RULE_NAME = "transferdesk"
# Stated, not left to the base's kustomization: a component's resources join the overlay's,
# which sets no namespace.
NAMESPACE = "transferdesk"
DASHBOARD_UID = "transferdesk-drift"
# Per service and version: a namespace is one service (its RayService); an Ingress replica
# keeps its own window, so replicas are averaged.
BY = "namespace, model_version"
REQUESTS = "ray_transferdesk_requests_total"
LATENCY = "ray_transferdesk_request_latency_ms_bucket"


def exported(figure: str) -> str:
    """A drift figure's gauge as Prometheus names it."""
    return f"ray_{GAUGES[figure]}"


def _per_version(figure: str, selector: str = "", by: str = BY) -> str:
    return f"avg by ({by}) ({exported(figure)}{selector})"


def _handoff_rate(selector: str = "") -> str:
    """All reasons together, each averaged over the replicas first."""
    return f"sum by ({BY}) ({_per_version('handoff_rate', selector, f'{BY}, reason')})"


def _serving(minutes: int) -> str:
    """Versions that answered within the last `minutes`: a gauge keeps its last value after a
    switch, and a version no longer answering should not keep an alert firing."""
    return f"sum by ({BY}) (rate({REQUESTS}[{minutes}m])) > 0"


def _alert(name: str, expr: str, drift: DriftSettings, summary: str, description: str) -> dict:
    return {
        "alert": name,
        "expr": f"({expr}) and on ({BY}) ({_serving(drift.alert_for_minutes)})",
        "for": f"{drift.alert_for_minutes}m",
        "labels": {"severity": "warning"},
        "annotations": {"summary": summary, "description": description},
    }


def alert_rules(drift: DriftSettings) -> list[dict]:
    """The alerts of the PrometheusRule, one per drift figure."""
    window = f"over the last {drift.window} messages"
    runbook = "docs/operations.md#drift"
    return [
        _alert(
            "TransferDeskIntentMixDrift",
            f"{_per_version('divergence')} > {drift.divergence_alert}",
            drift,
            "{{ $labels.model_version }}: the intent mix moved away from validation's",
            f'Jensen-Shannon divergence {{{{ $value | printf "%.3f" }}}} {window}, over '
            f"{drift.divergence_alert}: new kinds of messages, or a change in traffic. "
            f"Review the hand-offs ({runbook}).",
        ),
        _alert(
            "TransferDeskHandoffRateHigh",
            f"{_handoff_rate()} > {drift.handoff_rate_alert}",
            drift,
            "{{ $labels.model_version }}: more messages handed to people",
            f"{{{{ $value | humanizePercentage }}}} of routed messages handed off {window}, over "
            f"{drift.handoff_rate_alert:.0%} (by reason: {GAUGES['handoff_rate']}; {runbook}).",
        ),
        _alert(
            "TransferDeskOutOfScopeRateHigh",
            f"{_per_version('out_of_scope_rate')} > {drift.out_of_scope_rate_alert}",
            drift,
            "{{ $labels.model_version }}: more messages out of scope",
            f"{{{{ $value | humanizePercentage }}}} of messages below the out-of-scope threshold "
            f"{window}, over {drift.out_of_scope_rate_alert:.0%} ({runbook}).",
        ),
        _alert(
            "TransferDeskConfidenceLow",
            f"{_per_version('mean_confidence')} < {drift.mean_confidence_alert}",
            drift,
            "{{ $labels.model_version }}: the model is less sure of its answers",
            f'mean top-intent confidence {{{{ $value | printf "%.2f" }}}} {window}, under '
            f"{drift.mean_confidence_alert} ({runbook}).",
        ),
    ]


def prometheus_rule(drift: DriftSettings) -> dict:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": RULE_NAME, "namespace": NAMESPACE},
        "spec": {"groups": [{"name": "transferdesk-drift", "rules": alert_rules(drift)}]},
    }


def _panel(title: str, targets: list[tuple[str, str]], unit: str, x: int, y: int, **field: object) -> dict:
    return {
        "type": "timeseries",
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit, **field}, "overrides": []},
        "targets": [
            {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def _threshold(value: float, below: bool = False) -> dict:
    """A panel's threshold line: red past the alert's threshold."""
    steps = [{"color": "green", "value": None}, {"color": "red", "value": value}]
    if below:
        steps = [{"color": "red", "value": None}, {"color": "green", "value": value}]
    return {
        "thresholds": {"mode": "absolute", "steps": steps},
        "custom": {"thresholdsStyle": {"mode": "line"}},
    }


def dashboard(drift: DriftSettings) -> dict:
    """Drift figures beside traffic, errors and latency, per version ($namespace picks the
    service)."""
    scope = 'namespace=~"$namespace"'

    def per_version(figure: str, by: str = BY) -> str:
        return _per_version(figure, f"{{{scope}}}", by)

    requests = f"sum by ({BY}) (rate({REQUESTS}{{{scope}}}[5m]))"
    errors = f'sum by ({BY}) (rate({REQUESTS}{{{scope}, status=~"5.."}}[5m]))'
    latency = f"sum by (le, model_version) (rate({LATENCY}{{{scope}}}[5m]))"
    version = "{{model_version}}"
    panels = [
        _panel("Requests per second", [(requests, version)], "reqps", 0, 0),
        _panel("Errors (5xx share)", [(f"{errors} / {requests}", version)], "percentunit", 12, 0),
        _panel(
            "Latency inside the Ingress",
            [
                (f"histogram_quantile(0.5, {latency})", f"p50 {version}"),
                (f"histogram_quantile(0.99, {latency})", f"p99 {version}"),
            ],
            "ms",
            0,
            8,
        ),
        _panel(
            "Intent mix divergence from validation (bits)",
            [(per_version("divergence"), version)],
            "none",
            12,
            8,
            **_threshold(drift.divergence_alert),
        ),
        _panel(
            "Hand-off rate by reason (routed messages)",
            [
                (per_version("handoff_rate", f"{BY}, reason"), f"{version} {{{{reason}}}}"),
                (_handoff_rate(f"{{{scope}}}"), f"{version} all"),
            ],
            "percentunit",
            0,
            16,
            **_threshold(drift.handoff_rate_alert),
        ),
        _panel(
            "Out-of-scope rate",
            [(per_version("out_of_scope_rate"), version)],
            "percentunit",
            12,
            16,
            **_threshold(drift.out_of_scope_rate_alert),
        ),
        _panel(
            "Mean confidence of the top intent",
            [(per_version("mean_confidence"), version)],
            "percentunit",
            0,
            24,
            **_threshold(drift.mean_confidence_alert, below=True),
        ),
        _panel(
            "Messages in the drift window (per Ingress replica)",
            [(per_version("messages"), version)],
            "none",
            12,
            24,
        ),
    ]
    return {
        "uid": DASHBOARD_UID,
        "title": "TransferDesk: traffic and drift",
        "description": f"Drift figures over each version's last {drift.window} messages per Ingress "
        "replica (args.drift), beside traffic, errors and latency. Generated by k8s/render.py.",
        "tags": ["transferdesk"],
        "schemaVersion": 39,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "1m",
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus"},
                {
                    "name": "namespace",
                    "type": "query",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": f"label_values({REQUESTS}, namespace)",
                    "includeAll": True,
                    "multi": True,
                },
            ]
        },
        "panels": [{**panel, "id": i + 1} for i, panel in enumerate(panels)],
    }
