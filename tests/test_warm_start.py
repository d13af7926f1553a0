"""Warm start (transferdesk/training/recipes/warm_start.py): intents added to, renamed in,
merged in and removed from a published version by a short fine-tune that starts from it."""

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TOY_INTENTS, tiny_run, toy_rows, write_csv
from transferdesk.cli.main import main
from transferdesk.config import RunConfig, WarmStartConfig, load_config
from transferdesk.errors import TransferDeskError
from transferdesk.model.modeling import IntentModel
from transferdesk.registry import open_version
from transferdesk.training.recipes.warm_start import Relabel
from transferdesk.training.train import train_and_register

OLD = ["reset_password", "track_order"]  # head order: sorted


def _rows(intents: list[str], start: int, stop: int) -> list[tuple[str, str]]:
    return [row for row in toy_rows(start, stop) if row[1] in intents]


@pytest.fixture
def parent(tiny_backbone: Path, tmp_path: Path) -> tuple[Path, RunConfig]:
    """A version that knows two of the three toy intents, and the run that made it."""
    files = {
        "train": write_csv(tmp_path / "train.csv", _rows(OLD, 0, 4)),
        "valid": write_csv(tmp_path / "valid.csv", [*_rows(OLD, 4, 6), ("weather today", "oos")]),
        "test": write_csv(tmp_path / "test.csv", [*_rows(OLD, 6, 8), ("oos weather", "oos")]),
    }
    cfg = tiny_run(tiny_backbone, files, tmp_path / "registry", name="toy")
    return train_and_register(cfg).path, cfg


def _warm(cfg: RunConfig, parent: Path, **settings: object) -> RunConfig:
    data = cfg.model_dump()
    data["warm_start"] = {"parent": str(parent), "epochs": 6, **settings}
    return RunConfig.model_validate(data)


def test_relabel_renames_merges_removes_and_adds() -> None:
    settings = WarmStartConfig(rename={"a": "b", "c": "see"}, remove=["d"])
    relabel = Relabel.of(["a", "b", "c", "d"], settings, ["a", "b", "see", "new", "d"])
    assert relabel.labels == ["b", "see", "new"] and relabel.added == ["new"]
    assert [relabel.label(x, "oos") for x in ("a", "c", "see", "d", "new")] == [
        "b",
        "see",
        "see",
        "oos",
        "new",
    ]
    assert relabel.label("d") is None
    probs = np.array([[0.1, 0.2, 0.3, 0.4]])
    # a and b merged (0.3), c renamed (0.3), d removed: its share spread over the rest; new: 0
    assert relabel.columns(probs) == pytest.approx(np.array([[0.5, 0.5, 0.0]]))
    assert relabel.summary() == {"renamed": {"c": "see"}, "merged": {"b": ["a", "b"]}, "removed": ["d"]}


def test_a_fate_per_intent() -> None:
    with pytest.raises(ValueError, match="both renamed and removed"):
        WarmStartConfig(rename={"a": "b"}, remove=["a"])
    with pytest.raises(ValueError, match="renamed onto removed"):
        WarmStartConfig(rename={"a": "b"}, remove=["b"])


def test_from_names_the_recipe(tmp_path: Path) -> None:
    cfg = load_config(None, {"warm_start.parent": str(tmp_path)})
    assert cfg.methods() == ["warm_start"]
    assert load_config(None, {}).methods() == ["finetune"]


def test_an_intent_added_from_a_few_examples(parent: tuple[Path, RunConfig], tmp_path: Path) -> None:
    path, cfg = parent
    new = write_csv(tmp_path / "reviewed.csv", _rows(["refund_status"], 0, 4))
    cfg = _warm(cfg, path).model_copy(
        update={"data": cfg.data.model_copy(update={"extra_train": [str(new)]})}
    )
    version = open_version(train_and_register(cfg).path)
    before = open_version(path)
    assert version.version == before.version + 1 and version.name == before.name
    assert version.labels == [*OLD, "refund_status"]  # the parent's order, then the new intent
    record = version.metrics["warm_start"]
    assert record["parent"] == before.spec and record["added"] == {"refund_status": 4}
    assert record["parent_manifest_sha256"] == before.manifest_sha256
    assert (
        f"Warm start from `{before.spec}`" in version.card and "`refund_status` (4 examples)" in version.card
    )
    model = IntentModel.from_pretrained(version)
    unseen = TOY_INTENTS["refund_status"][4:]
    assert [p.intent for p in model.predict(unseen)] == ["refund_status"] * len(unseen)
    old = [t for intent in OLD for t in TOY_INTENTS[intent][4:]]
    assert [p.intent for p in model.predict(old)] == [lab for lab in OLD for _ in TOY_INTENTS[lab][4:]]
    # The parent's encoder, not the backbone's: the first thing a warm start keeps.
    assert not np.allclose(
        model.embed(old), IntentModel.from_backbone(cfg.model.backbone, OLD, cfg.model).embed(old)
    )


def test_renamed_and_removed_intents(parent: tuple[Path, RunConfig], tmp_path: Path) -> None:
    path, cfg = parent
    cfg = _warm(cfg, path, rename={"reset_password": "password_help"}, remove=["track_order"])
    version = open_version(train_and_register(cfg).path)
    assert version.labels == ["password_help"]
    assert version.metrics["warm_start"]["renamed"] == {"reset_password": "password_help"}
    assert version.metrics["warm_start"]["removed"] == ["track_order"]
    # The removed intent's test rows count as out-of-scope ones now.
    assert version.metrics["test"]["oos_rows"] == 1 + 2 and version.metrics["test"]["per_intent"].keys() == {
        "password_help",
        "oos",
    }
    assert "`track_order` removed" in version.card


def test_clear_errors(parent: tuple[Path, RunConfig], tmp_path: Path) -> None:
    path, cfg = parent
    with pytest.raises(TransferDeskError, match="not intents of"):
        train_and_register(_warm(cfg, path, rename={"nope": "x"}))
    with pytest.raises(TransferDeskError, match="not found"):
        train_and_register(_warm(cfg, tmp_path / "missing"))


def test_train_from_on_the_command_line(parent: tuple[Path, RunConfig], tmp_path: Path, capsys) -> None:
    path, cfg = parent
    new = write_csv(tmp_path / "reviewed.csv", _rows(["refund_status"], 0, 4))
    (tmp_path / "run.yaml").write_text(cfg.to_yaml())
    argv = [
        "train",
        "--config",
        str(tmp_path / "run.yaml"),
        "--from",
        str(path),
        "--data.extra_train",
        str(new),
    ]
    assert main([*argv, "--warm_start.epochs", "2"]) == 0
    out = Path(capsys.readouterr().out.strip().splitlines()[-1])
    meta = json.loads((out / "metrics.json").read_text())
    assert meta["warm_start"]["epochs"] == 2 and open_version(out).labels[-1] == "refund_status"
