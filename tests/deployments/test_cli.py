from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from deployments.cli import SERVE_YAML, serve_config
from transferdesk.errors import TransferDeskError


def args(**values: object) -> argparse.Namespace:
    defaults = {"config": str(SERVE_YAML), "model": None, "policy": None, "port": 8000, "host": "127.0.0.1"}
    return argparse.Namespace(**{**defaults, "no_auth": False, "set": [], **values})


def test_command_line_fills_the_serve_config(tmp_path: Path) -> None:
    model = tmp_path / "m" / "v1"
    model.mkdir(parents=True)
    (model / "manifest.json").write_text("{}")
    config = serve_config(args(model=str(model), no_auth=True, port=9001, set=["top_k=5"]))
    app_args = config["applications"][0]["args"]
    assert app_args["model"] == str(model.resolve())
    assert Path(app_args["routing_policy"]).is_absolute()
    assert app_args["auth"]["disabled"] is True and app_args["top_k"] == 5
    assert config["http_options"]["port"] == 9001


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TransferDeskError, match="not found"):
        serve_config(args(model=str(tmp_path / "nothing")))
