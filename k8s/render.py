"""Write k8s/'s copies of the serving settings from their one source.

The Serve config is written once per topology: deployments/serve.yaml (fused, what `serve run`
and `transferdesk serve` start) and deployments/serve-split.yaml, plus k8s/serve-targets.yaml,
which says which of them each kustomize target serves and what it changes in it (sizes,
autoscaling, a few args). Kustomize cannot template, so this script renders each target's
serveConfigV2 into a RayService patch, copies the routing policy into the ConfigMap's
source, which kustomize may not read from outside k8s/, and writes the alert rules and the
Grafana dashboard of k8s/components/monitoring from the application's `args.drift`:

    .venv/bin/python k8s/render.py           # write the files
    .venv/bin/python k8s/render.py --check   # exit 1, naming them, where a file differs

tests/k8s checks the written files against a fresh rendering, so a hand edit fails CI.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import textwrap
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict

from deployments.alerts import dashboard, prometheus_rule
from deployments.config import ServeArgs

ROOT = Path(__file__).resolve().parents[1]
SERVE_YAML = ROOT / "deployments" / "serve.yaml"
# Each topology's Serve config (deployments/topology.py): the deployments differ, the args not.
SERVE_YAMLS = {"fused": SERVE_YAML, "split": SERVE_YAML.with_name("serve-split.yaml")}
TARGETS_YAML = ROOT / "k8s" / "serve-targets.yaml"
POLICY = ROOT / "deployments" / "policies" / "northwind.yaml"
POLICY_COPY = ROOT / "k8s" / "base" / "routing-policy.yaml"
# The alerts and dashboard, from the application's args.drift (deployments/alerts.py).
MONITORING = ROOT / "k8s" / "components" / "monitoring"
RULE = MONITORING / "prometheusrule.yaml"
DASHBOARD = MONITORING / "dashboard.json"
COMMAND = ".venv/bin/python k8s/render.py"
SERVICE = "transferdesk"  # the RayService every patch applies to (k8s/base/rayservice.yaml)

Number = int | float  # int first: 1 stays 1, not 1.0


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not a no-op


class ActorOptions(Strict):
    num_cpus: Number | None = None
    num_gpus: Number | None = None
    memory: int | None = None


class Autoscaling(Strict):
    min_replicas: int | None = None
    initial_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: Number | None = None
    upscale_delay_s: Number | None = None
    downscale_delay_s: Number | None = None


class Sizes(Strict):
    """What a target may change in one deployment: its size, nothing of what it does."""

    num_replicas: int | None = None
    max_ongoing_requests: int | None = None
    max_queued_requests: int | None = None
    ray_actor_options: ActorOptions | None = None
    user_config: dict[str, Any] | None = None  # checked against ClassifierConfig by tests/k8s
    autoscaling_config: Autoscaling | None = None


class Target(Strict):
    output: str  # the RayService patch written, relative to k8s/
    topology: Literal["fused", "split"]  # which Serve config it starts from (SERVE_YAMLS)
    about: str  # the written file's header
    args: dict[str, Any] = {}  # merged into the application's args
    deployments: dict[str, Sizes] = {}


class Targets(Strict):
    serve: dict[str, Any] = {}  # merged into serve.yaml's top-level settings, every target
    targets: dict[str, Target]


def merge(base: Any, change: Any) -> Any:
    """`change` over `base`: mappings key by key, anything else replaced."""
    if not (isinstance(base, dict) and isinstance(change, dict)):
        return copy.deepcopy(change)
    out = copy.deepcopy(base)
    for key, value in change.items():
        out[key] = merge(out[key], value) if key in out else copy.deepcopy(value)
    return out


def serve_config(sources: dict[str, dict], targets: Targets, name: str) -> dict:
    """The whole Serve config of one target: its topology's (of `sources`, the loaded
    SERVE_YAMLS) with the target's changes."""
    target = targets.targets[name]
    config = merge(sources[target.topology], targets.serve)
    (app,) = config["applications"]
    app["args"] = merge(app["args"], target.args)
    deployments = {d["name"]: d for d in app["deployments"]}
    unknown = set(target.deployments) - set(deployments)
    if unknown:
        raise ValueError(
            f"{TARGETS_YAML.name}, target {name}: no deployment {sorted(unknown)} in the "
            f"{target.topology} topology's {SERVE_YAMLS[target.topology].name}"
        )
    for deployment, sizes in target.deployments.items():
        deployments[deployment].update(merge(deployments[deployment], sizes.model_dump(exclude_none=True)))
    return config


def comment(text: str) -> str:
    lines = textwrap.wrap(" ".join(text.split()), 92)
    return "".join(f"# {line}\n" for line in lines)


def patch(sources: dict[str, dict], targets: Targets, name: str) -> str:
    """The RayService patch that sets one target's serveConfigV2."""
    body = yaml.safe_dump(serve_config(sources, targets, name), sort_keys=False, width=100)
    source = SERVE_YAMLS[targets.targets[name].topology].name
    return (
        f"# GENERATED by k8s/render.py from deployments/{source} and k8s/serve-targets.yaml\n"
        f"# (target `{name}`): do not edit. Change those and run `{COMMAND}`.\n#\n"
        + comment(targets.targets[name].about)
        + f"apiVersion: ray.io/v1\nkind: RayService\nmetadata:\n  name: {SERVICE}\nspec:\n"
        + "  serveConfigV2: |\n"
        + textwrap.indent(body, "    ")
    )


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def serve_yamls() -> dict[str, dict]:
    """Each topology's Serve config, loaded."""
    return {topology: load(path) for topology, path in SERVE_YAMLS.items()}


def rendered(sources: dict[str, dict] | None = None, targets: dict | None = None) -> dict[Path, str]:
    """Every file this script writes, by path, rendered from the sources (or the given Serve
    configs, by topology, and targets)."""
    sources = serve_yamls() if sources is None else sources
    checked = Targets.model_validate(load(TARGETS_YAML) if targets is None else targets)
    files = {ROOT / "k8s" / t.output: patch(sources, checked, name) for name, t in checked.targets.items()}
    files |= monitoring(sources, checked)
    files[POLICY_COPY] = (
        "# GENERATED by k8s/render.py: a copy of deployments/policies/northwind.yaml, which kustomize\n"
        f"# cannot read from here. Edit that file and run `{COMMAND}`.\n" + POLICY.read_text()
    )
    return files


def monitoring(sources: dict[str, dict], targets: Targets) -> dict[Path, str]:
    """The PrometheusRule and the Grafana dashboard, their thresholds the application's
    args.drift: one component for every target, so no target may change them."""
    if changed := sorted(name for name, t in targets.targets.items() if "drift" in t.args):
        raise ValueError(
            f"{TARGETS_YAML.name}, targets {changed}: args.drift sets the alerts every target shares; "
            "change it in deployments/serve.yaml"
        )
    (app,) = sources["fused"]["applications"]
    drift = ServeArgs.model_validate(app["args"]).drift
    rule = yaml.safe_dump(prometheus_rule(drift), sort_keys=False, width=100)
    return {
        RULE: f"# GENERATED by k8s/render.py from deployments/serve.yaml's args.drift: do not edit.\n"
        f"# Change those and run `{COMMAND}`.\n" + rule,
        DASHBOARD: json.dumps(dashboard(drift), indent=2) + "\n",
    }


def stale(files: dict[Path, str]) -> list[Path]:
    return [path for path, text in files.items() if not path.exists() or path.read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file differs")
    args = parser.parse_args(argv)
    files = rendered()
    changed = stale(files)
    for path in changed:
        if args.check:
            print(f"{path.relative_to(ROOT)} differs from its rendering: run `{COMMAND}`", file=sys.stderr)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(files[path])
            print(f"wrote {path.relative_to(ROOT)}")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
