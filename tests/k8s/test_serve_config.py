"""The Serve config is written once per topology (deployments/serve.yaml, fused, and
deployments/serve-split.yaml, plus the cluster's sizes in k8s/serve-targets.yaml) and rendered
into k8s/ by k8s/render.py: the written files are the
rendering, every kustomize target serves its own, each rendering is a valid Serve config that
fits the Ray cluster it runs on, and what k8s/ repeats of it by hand (ports, mount paths, the
Ray version) agrees with it."""

from __future__ import annotations

import copy
import importlib.util
import re
import sys
import tomllib
from fractions import Fraction
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from tests.k8s.test_manifests import K8S, ROOT, TARGETS, _pod_templates, one


def _load_render():
    spec = importlib.util.spec_from_file_location("k8s_render", K8S / "render.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the models' annotations through it
    spec.loader.exec_module(module)
    return module


render = _load_render()
# kustomize target → its section of k8s/serve-targets.yaml
SECTIONS = {"base": "base", "overlays/local": "local", "overlays/production": "production"}
APP_DIR = "/home/ray/app"  # the image's WORKDIR: the app's relative paths start there


def serve_yaml() -> dict:
    return yaml.safe_load(render.SERVE_YAML.read_text())


def targets() -> dict:
    return yaml.safe_load(render.TARGETS_YAML.read_text())


def serve_config(doc: dict) -> dict:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def topology(config: dict) -> str:
    return config["applications"][0]["args"]["topology"]


def deployments(config: dict) -> dict[str, dict]:
    return {d["name"]: d for d in config["applications"][0]["deployments"]}


def test_k8s_files_are_the_rendering_of_serve_yaml() -> None:
    stale = [str(p.relative_to(ROOT)) for p in render.stale(render.rendered())]
    assert not stale, (
        f"{', '.join(stale)} differ from what deployments/serve.yaml and k8s/serve-targets.yaml "
        f"render (edited by hand, or not rendered after a change): run `{render.COMMAND}`"
    )


def test_every_target_serves_its_own_rendering(rendered: dict) -> None:
    assert set(SECTIONS) == set(TARGETS) and set(SECTIONS.values()) == set(targets()["targets"])
    checked = render.Targets.model_validate(targets())
    for target, section in SECTIONS.items():
        expected = render.serve_config(render.serve_yamls(), checked, section)
        assert serve_config(one(rendered[target], "RayService")) == expected, target


def _configs(rendered: dict) -> dict[str, dict]:
    out = {f"deployments/{path.name}": render.load(path) for path in render.SERVE_YAMLS.values()}
    out.update({target: serve_config(one(rendered[target], "RayService")) for target in TARGETS})
    return out


def test_every_serve_config_is_valid(rendered: dict) -> None:
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    from deployments.config import ClassifierConfig, ServeArgs
    from deployments.topology import DEPLOYMENTS, classifier_deployment

    for name, config in _configs(rendered).items():
        ServeDeploySchema.model_validate(config)
        ServeArgs.model_validate(config["applications"][0]["args"])
        for deployment in deployments(config).values():
            # Ray takes a misspelt autoscaling key without a word: name them all here.
            unknown = set(deployment["autoscaling_config"]) - set(AutoscalingConfig.model_fields)
            assert not unknown, (name, deployment["name"], unknown)
            scaling = deployment["autoscaling_config"]
            assert scaling["min_replicas"] <= scaling["max_replicas"], (name, deployment["name"])
            assert "num_cpus" in deployment["ray_actor_options"], (name, deployment["name"])
        assert sorted(deployments(config)) == sorted(DEPLOYMENTS[topology(config)]), name
        classifier = classifier_deployment(config["applications"][0])
        batching = ClassifierConfig.model_validate(classifier["user_config"])
        assert classifier["max_ongoing_requests"] > batching.max_batch_size, name  # batches can fill


def test_production_classifies_on_gpus_without_api_docs(rendered: dict) -> None:
    config = serve_config(one(rendered["overlays/production"], "RayService"))
    assert config["applications"][0]["args"]["docs"] == {"exposure": "off"}
    assert topology(config) == "split"  # the classifier's replicas on the GPU workers
    assert deployments(config)["Classifier"]["ray_actor_options"]["num_gpus"] == 1
    for target in ("base", "overlays/local"):
        cpu = serve_config(one(rendered[target], "RayService"))
        assert topology(cpu) == "fused" and "num_gpus" not in str(cpu), target


def test_a_change_to_serve_yaml_reaches_every_target_but_where_one_sizes_it() -> None:
    from deployments.topology import classifier_deployment

    changed = render.serve_yamls()
    for config in changed.values():
        classifier_deployment(config["applications"][0])["autoscaling_config"]["target_ongoing_requests"] = 17
        config["applications"][0]["args"]["top_k"] = 5
    checked = render.Targets.model_validate(targets())
    for section in checked.targets:
        config = render.serve_config(changed, checked, section)
        assert config["applications"][0]["args"]["top_k"] == 5
        scaling = classifier_deployment(config["applications"][0])["autoscaling_config"]
        assert scaling["target_ongoing_requests"] == (64 if section == "production" else 17), section
    files = render.rendered(sources=changed)
    assert set(render.stale(files)) == {ROOT / "k8s" / t["output"] for t in targets()["targets"].values()}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d.update(autoscaling_config={"max_replica": 3}), "max_replica"),
        (lambda d: d.update(ray_actor_options={"num_cpu": 1}), "num_cpu"),
        (lambda d: d.update(import_path="elsewhere:app"), "import_path"),  # sizes only
    ],
)
def test_a_misspelt_or_unsized_setting_is_refused(change, expected: str) -> None:
    broken = targets()
    change(broken["targets"]["base"]["deployments"]["Ingress"])
    with pytest.raises(ValidationError, match=expected):
        render.rendered(targets=broken)


@pytest.mark.parametrize("name", ["Clasifier", "Classifier"])  # misspelt; the split topology's
def test_an_unknown_deployment_is_refused(name: str) -> None:
    broken = targets()
    broken["targets"]["base"]["deployments"][name] = {"max_ongoing_requests": 4}
    with pytest.raises(ValueError, match=f"no deployment \\['{name}'\\] in the fused topology"):
        render.rendered(targets=broken)


def _quantity(value: str | int) -> Fraction:
    text = str(value)
    return Fraction(text[:-1]) / 1000 if text.endswith("m") else Fraction(text)


def _nodes(service: dict) -> list[list[Fraction]]:
    """[CPUs, GPUs] of every Ray worker the autoscaler may start (the head takes no replicas)."""
    spec = service["spec"]["rayClusterConfig"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    nodes = []
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        cpus = _quantity(group["rayStartParams"].get("num-cpus", limits["cpu"]))
        gpus = _quantity(limits.get("nvidia.com/gpu", 0))
        nodes += [[cpus, gpus] for _ in range(group["maxReplicas"])]
    return nodes


@pytest.mark.parametrize("target", TARGETS)
def test_the_serve_app_fits_its_cluster_at_max_replicas(rendered: dict, target: str) -> None:
    service = one(rendered[target], "RayService")
    replicas = []
    for name, deployment in deployments(serve_config(service)).items():
        options = deployment["ray_actor_options"]
        demand = [Fraction(str(options["num_cpus"])), Fraction(str(options.get("num_gpus", 0)))]
        replicas += [(name, demand)] * deployment["autoscaling_config"]["max_replicas"]
    nodes = _nodes(service)
    unplaced = []
    for name, (cpus, gpus) in sorted(replicas, key=lambda r: (r[1][1], r[1][0]), reverse=True):
        node = next((n for n in nodes if n[0] >= cpus and n[1] >= gpus), None)
        if node is None:
            unplaced.append(name)
        else:
            node[0] -= cpus
            node[1] -= gpus
    assert not unplaced, f"{target}: no worker left for replicas of {unplaced}"


def test_the_serve_port_is_the_one_the_cluster_routes_to(rendered: dict) -> None:
    port = serve_yaml()["http_options"]["port"]
    for target in TARGETS:
        service = one(rendered[target], "RayService")
        assert serve_config(service)["http_options"]["port"] == port, target
        assert serve_config(service)["http_options"]["host"] == "0.0.0.0", target  # reachable in the pod
        head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert {p["name"]: p["containerPort"] for p in head["ports"]}["serve"] == port, target
        ingress = one(rendered[target], "Ingress")
        backends = [p["backend"]["service"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]]
        assert {b["port"]["number"] for b in backends} == {port}, target
        policy = one(rendered[target], "NetworkPolicy", "transferdesk-serve-from-ingress")
        assert [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]] == [port], target


def test_the_app_paths_are_where_the_pods_mount_them(rendered: dict) -> None:
    assert f"WORKDIR {APP_DIR}" in (ROOT / "Dockerfile").read_text()
    for target in TARGETS:
        service = one(rendered[target], "RayService")
        args = serve_config(service)["applications"][0]["args"]
        policy = Path(APP_DIR, args["routing_policy"])
        registry = Path(APP_DIR, args["model"].split("/")[0])
        configmap = one(rendered[target], "ConfigMap", "transferdesk-routing-policy")
        assert policy.name in configmap["data"], target
        for name, template in _pod_templates(service):
            volumes = {v["name"]: v for v in template["spec"]["volumes"]}
            for container in template["spec"]["containers"]:
                mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
                assert "persistentVolumeClaim" in volumes[mounts[str(registry)]], name
                policy_volume = volumes[mounts[str(policy.parent)]]
                assert policy_volume["configMap"]["name"] == configmap["metadata"]["name"], name


def test_every_ray_cluster_runs_the_pinned_ray(rendered: dict) -> None:
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ray = next(re.search(r"==([\d.]+)", p).group(1) for p in pins if p.startswith("ray["))
    for target in TARGETS:
        for doc in (d for d in rendered[target] if d["apiVersion"] == "ray.io/v1"):
            spec = doc["spec"].get("rayClusterConfig") or doc["spec"].get("rayClusterSpec") or doc["spec"]
            assert spec["rayVersion"] == ray, (target, doc["kind"])


def test_the_routing_policy_configmap_is_a_rendered_copy() -> None:
    copied = render.rendered()[render.POLICY_COPY]
    assert copied.endswith(render.POLICY.read_text())
    assert yaml.safe_load(copied) == yaml.safe_load(render.POLICY.read_text())


def test_render_check_names_the_command(tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "k8s" / "base" / "serve-config.yaml"
    files = {out: "the rendering\n"}
    monkeypatch.setattr(render, "ROOT", tmp_path)
    monkeypatch.setattr(render, "rendered", lambda: copy.deepcopy(files))
    assert render.main(["--check"]) == 1  # missing
    assert "k8s/base/serve-config.yaml" in capsys.readouterr().err
    assert render.main([]) == 0 and out.read_text() == "the rendering\n"
    out.write_text("edited by hand\n")
    assert render.main(["--check"]) == 1
    assert render.COMMAND in capsys.readouterr().err
