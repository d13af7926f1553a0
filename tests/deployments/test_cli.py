from __future__ import annotations

from pathlib import Path

import pytest

from deployments.cli import SERVE_YAML, serve_config
from deployments.topology import classifier_deployment
from tests.deployments.conftest import train_versions, write_policy
from transferdesk.cli.main import build_parser
from transferdesk.errors import TransferDeskError

# The toy versions' routing policy, which every command here serves them with (the default one
# routes the northwind intents and asks for heads the toy lacks).
POLICY: list[Path] = []


@pytest.fixture(scope="module", autouse=True)
def _toy_policy(tmp_path_factory: pytest.TempPathFactory) -> None:
    POLICY[:] = [write_policy(tmp_path_factory.mktemp("policy") / "policy.yaml")]


def serve_args(*argv: str) -> object:
    return build_parser().parse_args(["serve", "--policy", str(POLICY[0]), *argv])


@pytest.fixture(scope="module")
def version(tmp_path_factory: pytest.TempPathFactory, tiny_backbone: Path) -> Path:
    return train_versions(tmp_path_factory.mktemp("cli"), tiny_backbone)[0]


def test_command_line_fills_the_serve_config(version: Path) -> None:
    argv = [str(version), "--no-auth", "--port", "9001", "--top_k", "5", "--limits.max_text_chars", "500"]
    config = serve_config(serve_args(*argv))
    app_args = config["applications"][0]["args"]
    assert app_args["model"] == str(version.resolve())
    assert Path(app_args["routing_policy"]).is_absolute()
    assert app_args["auth"]["disabled"] is True and app_args["top_k"] == 5
    assert app_args["limits"]["max_text_chars"] == 500 and app_args["limits"]["max_batch_texts"] == 64
    assert config["http_options"]["port"] == 9001
    # --set KEY=VALUE is another spelling of the same flags.
    assert serve_config(serve_args(str(version), "--set", "top_k=4"))["applications"][0]["args"]["top_k"] == 4


def test_bad_values_and_missing_models_are_clear_errors(tmp_path: Path, version: Path) -> None:
    with pytest.raises(TransferDeskError, match="not found"):
        serve_config(serve_args(str(tmp_path / "nothing")))
    with pytest.raises(TransferDeskError, match=r"top_k: Input should be less than or equal to 10"):
        serve_config(serve_args(str(version), "--top_k", "11"))
    with pytest.raises(TransferDeskError, match="no such setting"):
        serve_config(serve_args(str(version), "--set", "topk=4"))
    # An ONNX runtime for a version without an export: said before anything starts.
    with pytest.raises(TransferDeskError, match="has no ONNX export; make one with `transferdesk export"):
        serve_config(serve_args(str(version), "--runtime", "onnx-int8"))
    with pytest.raises(TransferDeskError, match="runtime: Input should be 'auto', 'torch'"):
        serve_config(serve_args(str(version), "--runtime", "tensorrt"))
    assert serve_config(serve_args(str(version)))["applications"][0]["args"]["runtime"] == "auto"
    # The Ingress's batches must hold the largest request.
    with pytest.raises(TransferDeskError, match=r"coalescing.max_texts \(64\) must hold the largest request"):
        serve_config(serve_args(str(version), "--limits.max_batch_texts", "100"))
    # Capture's store: a database URL, checked before anything starts.
    with pytest.raises(TransferDeskError, match=r"capture\.store: .*the store URL is not a database"):
        serve_config(serve_args(str(version), "--capture.store", "capture.db"))
    relative = serve_config(serve_args(str(version), "--capture.store", "sqlite:///here/capture.db"))
    assert (
        relative["applications"][0]["args"]["capture"]["store"] == f"sqlite:///{Path.cwd()}/here/capture.db"
    )
    big = serve_args(str(version), "--limits.max_batch_texts", "100", "--coalescing.max_texts", "128")
    assert serve_config(big)["applications"][0]["args"]["coalescing"] == {"max_texts": 128}


def test_a_model_the_default_policy_was_not_written_for_serves_with_it_narrowed(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A model trained on other intents, without the heads the default policy's rules ask for:
    with no policy named, it serves with the default narrowed to it; a policy named for it
    that cannot route it stops `transferdesk serve` (exit 2), before Serve would retry a build
    that cannot succeed for ever."""
    import shutil

    from deployments.routing import load_policy
    from transferdesk.cli.main import main
    from transferdesk.registry import open_version

    released = Path(__file__).parents[1] / "fixtures" / "released"
    spec = f"{shutil.copytree(released, tmp_path / 'registry')}/published-0.1.0@production"
    version = open_version(spec)
    app_args = serve_config(build_parser().parse_args(["serve", spec]))["applications"][0]["args"]
    assert "serving with it narrowed to the model" in capsys.readouterr().out
    policy = load_policy(app_args["routing_policy"], version.labels, version.tasks)  # it fits
    assert policy.rules == [] and policy.priority_from is None
    assert set(policy.routes) <= set(version.labels) and policy.default == policy.fallback
    default = str(Path(__file__).parents[2] / "deployments" / "policies" / "northwind.yaml")
    assert main(["serve", spec, "--policy", default]) == 2
    err = capsys.readouterr().err
    assert "cannot be served with this routing policy" in err and "--policy FILE" in err


def test_the_topology_picks_its_serve_config(version: Path) -> None:
    fused = serve_config(serve_args(str(version)))["applications"][0]
    assert fused["args"]["topology"] == "fused" and [d["name"] for d in fused["deployments"]] == ["Ingress"]
    split = serve_config(serve_args(str(version), "--topology", "split"))["applications"][0]
    assert split["args"]["topology"] == "split"
    assert {d["name"] for d in split["deployments"]} == {"Ingress", "Tokenizer", "Classifier", "Router"}
    # A config whose deployments are another topology's: said now, not by Serve once deployed.
    with pytest.raises(TransferDeskError, match=r"the split topology has \['Classifier', 'Ingress'"):
        serve_config(serve_args(str(version), "--config", str(SERVE_YAML), "--topology", "split"))


def test_served_versions_are_pinned(version: Path) -> None:
    from deployments.config import ClassifierConfig, ServeArgs

    model_dir = version.parent
    # A model directory on the command line becomes its newest version, written out exactly.
    app_args = serve_config(serve_args(str(model_dir)))["applications"][0]["args"]
    assert app_args["model"] == str(model_dir.resolve() / "v2")
    # In a config, a model directory is refused: replicas started later would serve the newest.
    with pytest.raises(TransferDeskError, match="name a stage"):
        serve_config(serve_args("--model", str(model_dir)))
    assert ServeArgs(model=f"{model_dir}@production").model.endswith("@production")
    with pytest.raises(ValueError, match="exact version"):
        ClassifierConfig(model=f"{model_dir}@canary")  # reconfigure() runs again on every restart
    with pytest.raises(TransferDeskError, match="no 'production' stage"):
        serve_config(serve_args(f"{model_dir}@production"))


@pytest.mark.parametrize("topology", ["fused", "split"])
def test_a_retrained_version_goes_out_as_a_canary_or_in_shadow(version: Path, topology: str) -> None:
    from transferdesk.registry import Registry

    model_dir = version.parent
    Registry(model_dir.parent).promote(model_dir / "v2", "canary", "tester", "retrained on reviewed messages")

    def user_config(*argv: str) -> dict:
        config = serve_config(serve_args(str(version), "--topology", topology, *argv))
        holder = classifier_deployment(config["applications"][0])
        assert holder["name"] == ("Ingress" if topology == "fused" else "Classifier")
        assert holder["user_config"]["max_batch_size"] == 16  # serve.yaml's batching kept
        return holder["user_config"]

    def rollout(*argv: str) -> dict:
        return user_config(*argv)["rollout"]

    # A stage is pinned to its version now: a replica restarted later must load the same one.
    canary = rollout("--canary", f"{model_dir}@canary", "--share", "0.25")
    assert canary == {"model": str((model_dir / "v2").resolve()), "mode": "canary", "share": 0.25}
    assert rollout("--shadow", str(model_dir / "v2"))["mode"] == "shadow"
    promoted = user_config("--switch", f"{model_dir}@canary")  # promote in place
    assert promoted["model"] == str((model_dir / "v2").resolve())
    with pytest.raises(TransferDeskError, match="share: Input should be less than or equal to 1"):
        rollout("--canary", f"{model_dir}@canary", "--share", "2")
    with pytest.raises(TransferDeskError, match="not found"):
        rollout("--canary", str(model_dir / "v9"))
    with pytest.raises(SystemExit):  # one second version at a time
        serve_args(str(version), "--canary", str(model_dir / "v2"), "--shadow", str(model_dir / "v2"))
