"""Recipes: the chain a run's data implies, names that do not resolve, and a method of one's
own (tests/toy_recipe.py) run through `transferdesk train` and a two-trial Ray Tune search."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from transferdesk.cli.main import main
from transferdesk.config import RunConfig
from transferdesk.errors import TransferDeskError
from transferdesk.model.modeling import IntentModel
from transferdesk.registry import open_version
from transferdesk.training.chain import resolve
from transferdesk.training.recipe import RECIPES

TOY = "tests.toy_recipe:LinearProbe"


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({}, ["finetune"]),
        ({"data": {"source": "s.csv"}}, ["source", "finetune"]),
        ({"data": {"source": "s.csv"}, "recipe": ["joint", "finetune"]}, ["joint", "finetune"]),
        ({"data": {"unlabelled": "p.txt"}}, ["self_training"]),
        ({"data": {"unlabelled": "p.txt"}, "semi_supervised": {"enabled": False}}, ["finetune"]),
        (
            {
                "data": {"source": "s.csv", "unlabelled": "p.txt"},
                "contrastive": {"epochs": 1},
            },
            ["source", "contrastive", "self_training"],
        ),
        (
            {
                "data": {"unlabelled": "p.txt"},
                "contrastive": {"epochs": 1},
                "semi_supervised": {"pseudo_labels": False},
            },
            ["contrastive", "finetune"],
        ),
    ],
)
def test_the_chain_a_run_data_implies(settings: dict, expected: list[str]) -> None:
    assert RunConfig.model_validate(settings).methods() == expected
    assert set(expected) <= set(RECIPES)  # every one of them registered


def test_names_that_do_not_resolve_say_what_does() -> None:
    with pytest.raises(
        TransferDeskError, match=r"unknown recipe 'distil'; registered: contrastive, finetune"
    ):
        resolve("distil")
    with pytest.raises(TransferDeskError, match=r"recipe 'tests.nowhere:Probe' cannot be imported"):
        resolve("tests.nowhere:Probe")


def encoder_unchanged(version_path: Path, backbone: Path) -> bool:
    trained = IntentModel.from_pretrained(version_path).network.encoder.state_dict()
    original = IntentModel.from_backbone(str(backbone), ["x"], RunConfig().model).network.encoder.state_dict()
    return all(torch.equal(trained[k], original[k]) for k in original)


def test_a_recipe_of_ones_own_trains_through_the_command_line(
    tiny_backbone: Path, toy_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    files = [f"--data.{split}={path}" for split, path in toy_files.items()]
    argv = ["train", "--output", str(tmp_path / "registry"), "--backbone", str(tiny_backbone), *files]
    fast = ["--model.max_length", "16", "--training.epochs", "3", "--runtime.progress", "false"]
    assert main([*argv, *fast, "--recipe", f"[{TOY}]"]) == 0
    version = open_version(tmp_path / "registry" / "intent-classifier")
    assert version.config.recipe == [TOY] and "accuracy" in version.metrics
    assert encoder_unchanged(version.path, tiny_backbone)  # the probe trained the head alone
    # The same command with the built-in method fine-tunes the encoder too.
    assert main([*argv, *fast, "--recipe", "[finetune]"]) == 0
    assert not encoder_unchanged(version.path.parent / "v2", tiny_backbone)
