from pathlib import Path

import pytest

from transferdesk.cli.flags import iter_fields
from transferdesk.config import RunConfig, load_config
from transferdesk.errors import TransferDeskError


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  epochs: 7\n  batch_size: 8\nmodel:\n  pooling: cls\n")
    cfg = load_config(path, {"training.epochs": "3"})
    assert cfg.training.epochs == 3  # CLI beats YAML
    assert cfg.training.batch_size == 8  # YAML beats defaults
    assert cfg.model.pooling == "cls"
    assert cfg.source_training.epochs == 3  # the source stage keeps its own defaults


def test_source_stage_defaults_survive_partial_yaml(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("source_training:\n  epochs: 5\n")
    cfg = load_config(path)
    assert cfg.source_training.epochs == 5
    assert cfg.source_training.batch_size == 32


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = load_config(None, {"data.few_shot_k": 5, "runtime.seed": 99})
    path = tmp_path / "dump.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"training.epochs": "0"}, "training.epochs"),
        ({"training.epocs": "3"}, "training.epocs"),
        ({"model.pooling": "max"}, "model.pooling"),
        ({"name": "has spaces"}, "name"),
    ],
)
def test_bad_values_name_the_setting(overrides: dict, named: str) -> None:
    with pytest.raises(TransferDeskError, match=named.replace(".", r"\.")):
        load_config(None, overrides)


def test_bad_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(TransferDeskError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("training: [1, 2\n")
    with pytest.raises(TransferDeskError, match="not valid YAML"):
        load_config(broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(TransferDeskError, match="mapping"):
        load_config(listy)


def test_every_leaf_setting_is_listed() -> None:
    names = [name for name, _ in iter_fields(RunConfig)]
    assert "training.encoder_lr" in names and "runtime.precision" in names
    assert "data" not in names  # sections are not leaves
    assert all(info.description for _, info in iter_fields(RunConfig))


TRAIN_CONFIGS = [
    p
    for p in sorted(Path(__file__).parent.parent.glob("configs/*.yaml"))
    if p.read_text().startswith("# transferdesk train")
]


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_ready_made_configs_load(path: Path) -> None:
    first_line = path.read_text().splitlines()[0]
    assert first_line == f"# transferdesk train --config configs/{path.name}"
    cfg = load_config(path)
    assert cfg.data.train and cfg.data.test
