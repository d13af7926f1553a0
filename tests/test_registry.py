import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from transferdesk.config import RunConfig
from transferdesk.errors import TransferDeskError
from transferdesk.registry import list_versions, load_model, resolve_model_dir, verify
from transferdesk.train import train_and_register


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """One tiny model trained and registered, shared by the tests of this module."""
    from tests.conftest import make_tiny_backbone, toy_rows, write_csv
    from transferdesk.config import load_config

    root = tmp_path_factory.mktemp("reg")
    backbone = make_tiny_backbone(root / "bb")
    cfg = load_config(
        None,
        {
            "output": str(root / "registry"),
            "model.backbone": str(backbone),
            "data.train": str(write_csv(root / "train.csv", toy_rows(0, 4))),
            "data.valid": str(write_csv(root / "valid.csv", [*toy_rows(4, 6), ("weather today", "oos")])),
            "data.test": str(write_csv(root / "test.csv", [*toy_rows(6, 8), ("oos weather", "oos")])),
            "training.epochs": 2,
            "runtime.progress": False,
            "runtime.num_threads": 1,
        },
    )
    return train_and_register(cfg)


def test_version_directory_is_complete(registered: Path) -> None:
    assert registered.name == "v1"
    for name in (
        "encoder/config.json",
        "encoder/model.safetensors",
        "encoder/tokenizer.json",
        "head.safetensors",
        "labels.json",
        "config.yaml",
        "model.json",
        "metrics.json",
        "model_card.md",
        "manifest.json",
        "test/confusion.png",
        "test/report.md",
    ):
        assert (registered / name).is_file(), name
    assert list((registered / "logs").glob("events.out.tfevents.*"))
    manifest = verify(registered)
    assert "head.safetensors" in manifest["files"] and len(manifest["files"]) >= 12
    metrics = json.loads((registered / "metrics.json").read_text())
    assert {"accuracy", "macro_f1", "test", "valid_history", "train_seconds"} <= metrics.keys()
    assert "oos_recall" in metrics["test"] and "oos_auroc" in metrics["test"]


def test_loaded_model_predicts_like_the_trained_one(registered: Path) -> None:
    model, cfg, info = load_model(registered)
    assert isinstance(cfg, RunConfig) and model.labels == json.loads((registered / "labels.json").read_text())
    probs = model.predict_proba(["where is my parcel", "forgot my password"])
    again, _, _ = load_model(registered)
    assert np.allclose(probs, again.predict_proba(["where is my parcel", "forgot my password"]), atol=1e-6)
    assert info["version"] == 1 and model.threshold == info["threshold"]


def test_new_runs_get_new_versions_and_never_overwrite(registered: Path) -> None:
    _, cfg, _ = load_model(registered)
    before = sorted(p.name for p in registered.parent.iterdir())
    second = train_and_register(
        cfg.model_copy(update={"training": cfg.training.model_copy(update={"epochs": 1})})
    )
    assert second.name == "v2" and verify(registered)
    assert resolve_model_dir(registered.parent) == second  # a model directory means its newest version
    assert [r["version"] for r in list_versions(registered.parent.parent)] == [1, 2]
    assert not [p for p in registered.parent.iterdir() if p.name.startswith(".staging")]
    assert set(before) < {p.name for p in registered.parent.iterdir()}


@pytest.mark.parametrize("damage", ["alter", "delete"])
def test_tampered_models_are_refused(registered: Path, tmp_path: Path, damage: str) -> None:
    copy = shutil.copytree(registered, tmp_path / "v1")
    if damage == "alter":
        with open(copy / "head.safetensors", "r+b") as f:
            f.seek(-4, 2)
            f.write(b"\x00\x01\x02\x03")
        expected = "altered: head.safetensors"
    else:
        (copy / "labels.json").unlink()
        expected = "missing: labels.json"
    with pytest.raises(TransferDeskError, match=expected):
        load_model(copy)


def test_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(TransferDeskError, match="not found"):
        load_model(tmp_path / "nothing")
    with pytest.raises(TransferDeskError, match="holds no model version"):
        load_model(tmp_path)
    with pytest.raises(TransferDeskError, match="does not exist"):
        list_versions(tmp_path / "nothing")


def test_threshold_applies_only_to_data_with_out_of_scope_rows(registered: Path) -> None:
    from transferdesk.data import Dataset
    from transferdesk.evaluate import evaluate

    model, _, _ = load_model(registered)
    model.threshold = 1.01  # every message is below it
    in_scope = Dataset(["where is my parcel", "forgot my password"], ["track_order", "reset_password"])
    plain = evaluate(model, in_scope, "oos", progress=False)
    assert plain["below_threshold"] == 1.0 and "oos" not in plain["predictions"]
    mixed = Dataset([*in_scope.texts, "weather today"], [*in_scope.labels, "oos"])
    scored = evaluate(model, mixed, "oos", progress=False)
    assert scored["predictions"] == ["oos"] * 3 and scored["oos_recall"] == 1.0
    assert scored["in_scope_accuracy"] == 0.0
