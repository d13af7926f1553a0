"""`transferdesk serve [MODEL]`: `serve run deployments/serve.yaml` (or serve-split.yaml, with
--topology split) with a model, a routing policy and an API key filled in, and a ready curl
command printed."""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from deployments.config import (
    KEYS_ENV,
    KEYS_FILE_ENV,
    ClassifierConfig,
    ServeArgs,
    is_exact_version,
    serve_env,
)
from deployments.front import serve_behind
from deployments.processes import serve_command
from deployments.routing import load_policy, narrowed
from deployments.topology import DEFAULT, check_deployments, classifier_deployment
from transferdesk.cli.flags import add_config_flags, config_overrides
from transferdesk.config import build_config, set_dotted
from transferdesk.errors import TransferDeskError
from transferdesk.model.runtime import choose_runtime
from transferdesk.registry import open_version, resolve_version_dir, split_stage

SERVE_YAML = Path(__file__).with_name("serve.yaml")  # the fused topology, the default
SERVE_YAMLS = {"fused": SERVE_YAML, "split": SERVE_YAML.with_name("serve-split.yaml")}


def add_serve_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "serve",
        help="serve a registry model over HTTP with Ray Serve (intent → queue, or a human agent)",
        description="Start Ray Serve locally with deployments/serve.yaml (the fused topology; "
        "--topology split: deployments/serve-split.yaml) and the given model. "
        f"API keys come from ${KEYS_ENV} or ${KEYS_FILE_ENV}; with neither, a one-time key is "
        "generated and printed. Ctrl-C stops it.",
    )
    parser.add_argument(
        "model_spec",
        nargs="?",
        metavar="MODEL",
        help="registry/<name>@<stage>, registry/<name>/v<N>, or registry/<name> for its newest "
        "version now [default: serve.yaml's]",
    )
    parser.add_argument(
        "--config",
        help="Serve config [default: deployments/serve.yaml, or deployments/serve-split.yaml with "
        "--topology split]",
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    parser.add_argument(
        "--no-front",
        action="store_true",
        help="serve from Serve's own proxy at --port, without the front door (deployments/front.py) "
        "that keeps answering while that proxy is restarted",
    )
    parser.add_argument(
        "--no-auth", action="store_true", help="same as --auth.disabled true: local development only"
    )
    rollout = parser.add_argument_group(
        "rollout",
        "The classifier's user_config, which a running service applies in place (--deploy): a "
        "second version beside MODEL (`rollout`: a retrained model, say registry/<name>@canary, "
        "pinned to its version now, answers a share of the calls, or scores every call in "
        "shadow; compare in GET /v1/model), or the version served (`model`: promote).",
    )
    second = rollout.add_mutually_exclusive_group()
    second.add_argument("--canary", metavar="VERSION", help="serve this version to --share of the calls")
    second.add_argument("--shadow", metavar="VERSION", help="score every call with it too; answer with MODEL")
    rollout.add_argument("--share", type=float, default=0.1, help="canary share [default: %(default)s]")
    rollout.add_argument(
        "--switch", metavar="VERSION", help="serve this version instead of MODEL's, in place (promote)"
    )
    parser.add_argument(
        "--deploy",
        metavar="ADDRESS",
        help="`serve deploy` to the running cluster whose dashboard is at ADDRESS (e.g. "
        "http://127.0.0.1:8265) instead of starting one. Give MODEL and the options the service "
        "runs with: then only the classifier's user_config differs (rollout, switch), which the "
        "replicas apply in place; any other difference redeploys the application (new replicas)",
    )
    # The application's args (serve.yaml's `args:`), e.g. --top_k 5 or --limits.max_text_chars 500.
    add_config_flags(parser, ServeArgs, aliases={"routing_policy": ("--policy", "FILE")})
    parser.set_defaults(func=cmd_serve)
    return parser


def serve_config(args: argparse.Namespace) -> dict:
    """serve.yaml (or the topology's config) with the command line applied and every path made
    absolute."""
    overrides = config_overrides(args)
    source = args.config or str(SERVE_YAMLS[overrides.get("topology", DEFAULT)])
    config = yaml.safe_load(Path(source).read_text())
    app = config["applications"][0]
    values = app.setdefault("args", {})
    for key, value in overrides.items():
        set_dotted(values, key, value)
    if args.model_spec:
        values["model"] = pinned(args.model_spec)
    if args.no_auth:
        set_dotted(values, "auth.disabled", True)
    settings = build_config(values, f"{source} (args) and the command line", ServeArgs).resolved()
    check_deployments(app, source)
    if args.config is None and "routing_policy" not in overrides:
        settings = fitted(settings)
    settings.servable()  # a clear error now, not a build that Serve retries for ever
    holder = classifier_deployment(app)
    user_config = holder.setdefault("user_config", {})
    if args.canary or args.shadow:
        mode, spec = ("canary", args.canary) if args.canary else ("shadow", args.shadow)
        user_config["rollout"] = {"model": exact(spec), "mode": mode, "share": args.share}
    if args.switch:
        user_config["model"] = exact(args.switch)
    checked = build_config(user_config, f"{source} ({holder['name']} user_config)", ClassifierConfig)
    if checked.rollout is not None:  # a damaged or missing version: said now
        second = open_version(checked.rollout.model)
        choose_runtime(second, checked.rollout.runtime or settings.runtime, settings.device)
    app["args"] = settings.model_dump()
    config["http_options"] = {**config.get("http_options", {}), "host": args.host, "port": args.port}
    return config


def fitted(settings: ServeArgs) -> ServeArgs:
    """With no policy named: the default one where it fits the model, else the default narrowed
    to it (routing.narrowed), written to a file of this run, so that any version `transferdesk
    train` makes serves with the defaults."""
    version = open_version(settings.model)
    try:
        load_policy(settings.routing_policy, version.labels, version.tasks)
        return settings
    except TransferDeskError as err:
        why = str(err)
    policy = narrowed(load_policy(settings.routing_policy), version.labels, version.tasks)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="transferdesk-policy-", delete=False) as f:
        yaml.safe_dump(policy.model_dump(mode="json", exclude_none=True), f, sort_keys=False)
    print(
        f"note: the default routing policy does not fit {version.spec} ({why}); serving with it "
        f"narrowed to the model, {f.name}: its intents without a route go to "
        f"{policy.fallback.destination}. Name a policy of its own with --policy FILE."
    )
    return settings.model_copy(update={"routing_policy": f.name})


def pinned(spec: str) -> str:
    """A stage or exact version as given; a model directory as its newest version now, so that
    the generated config names one version (replicas started later serve the same)."""
    if split_stage(spec)[1] is not None or is_exact_version(spec):
        return spec
    version = resolve_version_dir(spec)
    print(f"serving {version}, the newest version of {spec} (name a stage or a version to choose)")
    return str(version)


def exact(spec: str) -> str:
    """The exact version a stage or directory names now: a user_config is applied again on
    every replica restart, and must load the same version then."""
    return str(resolve_version_dir(spec).resolve())


def deploy(config: dict, address: str, env: dict[str, str]) -> None:
    """`serve deploy` the config to a running cluster: Serve applies a changed user_config
    (a rollout, a model switch) to the running replicas in place."""
    serve = serve_command()
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="transferdesk-deploy-") as f:
        yaml.safe_dump(config, f, sort_keys=False)
        f.flush()
        done = subprocess.run([serve, "deploy", f.name, "--address", address], env=env)
    if done.returncode != 0:
        raise TransferDeskError(f"serve deploy to {address} failed (exit code {done.returncode})")
    user_config = classifier_deployment(config["applications"][0]).get("user_config", {})
    rollout = user_config.get("rollout")
    served = user_config.get("model") or config["applications"][0]["args"]["model"]
    what = f"{rollout['mode']} {rollout['model']}" if rollout else "no rollout"
    print(
        f"deployed to {address}: {served}, {what}. GET /v1/model shows what serves, the rollout "
        "and, in shadow, how often the two disagree"
    )


def cmd_serve(args: argparse.Namespace) -> None:
    config = serve_config(args)
    env = serve_env()
    if args.deploy:  # the running service keeps its own keys
        deploy(config, args.deploy, env)
        return
    auth = not config["applications"][0]["args"]["auth"]["disabled"]
    if not auth:
        print("warning: API-key authentication is DISABLED: for local development only")
    # A key of one's own is never printed (terminals are logged and shared); one made for this
    # run alone is, since nobody could use the service otherwise.
    generated = auth and not (env.get(KEYS_ENV) or env.get(KEYS_FILE_ENV))
    if generated:
        env[KEYS_ENV] = secrets.token_urlsafe(24)
        print("no API key configured: generated one for this run (below)")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="transferdesk-serve-", delete=False) as f:
        yaml.safe_dump(config, f, sort_keys=False)
    key = f' -H "Authorization: Bearer ${KEYS_ENV}"' if auth else ""
    print(
        f"serving {config['applications'][0]['args']['model']} at http://{args.host}:{args.port} "
        "(Ctrl-C stops it). When it says the application is RUNNING, try:\n\n"
        + (f"  export {KEYS_ENV}={env[KEYS_ENV]}\n" if generated else "")
        + f"  curl -s http://{args.host}:{args.port}/v1/route{key} -H 'Content-Type: application/json' "
        """-d '{"text": "where is my parcel?? it was due on monday, this is ridiculous"}'\n\n"""
        f"The Serve config is {f.name}: to switch models in place, `serve deploy` a copy of it "
        "with `model:` added to the classifier's user_config (the Ingress's when fused, the "
        "Classifier's when split). Replica logs (JSON, with request "
        "ids) are under /tmp/ray/session_latest/logs/serve/.\n",
        flush=True,
    )
    if not args.no_front:
        sys.exit(serve_behind(Path(f.name), env))
    serve = serve_command()
    os.execvpe(serve, [serve, "run", f.name], env)
