"""Self-training from an unlabelled pool, with the tiny in-test BERT."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import BRIDGE_WORDS, make_tiny_backbone, with_settings, write_csv
from transferdesk.config import RunConfig
from transferdesk.data import Dataset
from transferdesk.errors import TransferDeskError
from transferdesk.model.modeling import IntentModel
from transferdesk.registry import Registry, open_version
from transferdesk.training.recipes import self_training
from transferdesk.training.recipes.self_training import (
    _student_data,
    pool_neighbours,
    select_pseudo_labels,
    smooth,
)
from transferdesk.training.train import run_training, train_and_register


def test_pseudo_labels_respect_threshold_and_per_intent_cap() -> None:
    probs = np.array(
        [
            [0.9, 0.05, 0.05],
            [0.8, 0.1, 0.1],
            [0.7, 0.2, 0.1],
            [0.4, 0.3, 0.3],  # below the threshold
            [0.1, 0.6, 0.3],
            [0.2, 0.2, 0.6],
        ]
    )
    assert select_pseudo_labels(probs, 0.5, None).tolist() == [0, 1, 2, 4, 5]
    assert select_pseudo_labels(probs, 0.5, 2).tolist() == [0, 1, 4, 5]  # intent 0: its 2 most confident
    assert select_pseudo_labels(probs, 0.95, None).tolist() == []
    # Unset cap: 3 × the mean kept per intent (here 3 × 68 / 10 → 21), so the teachers'
    # favourite intent cannot swamp the rest; it keeps its most confident rows.
    top = [0] * 50 + [i for i in range(1, 10) for _ in range(2)]
    skewed = np.full((len(top), 10), 0.01)
    skewed[np.arange(len(top)), top] = np.linspace(0.6, 0.9, len(top))
    kept = select_pseudo_labels(skewed, 0.5, None)
    assert len(kept) == 21 + 18
    favourite = kept[kept < 50]
    assert favourite.tolist() == list(range(29, 50))


def test_student_targets_soft_and_hard() -> None:
    train = Dataset(["a", "b"], ["x", "y"])
    probs = np.array([[0.2, 0.8], [0.9, 0.1], [0.4, 0.6]], dtype=np.float32)
    data, soft = _student_data(train, ["x", "y"], ["p", "q", "r"], probs, np.array([0, 2]), soft=True)
    assert data.texts == ["a", "b", "p", "r"] and data.labels == ["x", "y", "y", "y"]
    np.testing.assert_allclose(soft.numpy(), [[1, 0], [0, 1], [0.2, 0.8], [0.4, 0.6]], rtol=1e-6)
    _, hard = _student_data(train, ["x", "y"], ["p", "q", "r"], probs, np.array([0, 2]), soft=False)
    assert hard.tolist() == [[1, 0], [0, 1], [0, 1], [0, 1]]


def test_neighbours_outvote_a_teachers_odd_mistake() -> None:
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.1, 0.9]])
    near = np.array([[1, 2], [0, 2], [0, 1], [2, 1]])  # rows 0-2 read alike, row 3 apart
    smoothed = smooth(probs, near, 0.5)
    assert smoothed.argmax(axis=1).tolist() == [0, 0, 0, 1]  # row 2 outvoted, row 3 kept
    np.testing.assert_allclose(smoothed[2], [0.5 * 0.4 + 0.5 * 0.85, 0.5 * 0.6 + 0.5 * 0.15])
    np.testing.assert_allclose(smoothed.sum(axis=1), 1.0)
    assert smooth(probs, None, 0.5) is probs
    assert smooth(probs, np.zeros((4, 0), dtype=int), 0.5) is probs  # a pool of one


def test_pool_neighbours_are_the_nearest_other_messages(bridge_config: RunConfig) -> None:
    cfg = with_settings(bridge_config, **{"semi_supervised.neighbours": 10})
    texts = ["a b c", "d e f", "g h", "a b c", "d e f", "x y z w"]
    near = pool_neighbours(cfg, cfg.model.backbone, texts, torch.device("cpu"))
    assert near.shape == (6, 5)  # 10 asked, 5 other messages
    assert (near != np.arange(6)[:, None]).all()  # never itself
    assert near[0, 0] == 3 and near[3, 0] == 0 and near[1, 0] == 4  # a same text is nearest
    assert pool_neighbours(cfg, cfg.model.backbone, ["alone"], torch.device("cpu")).shape == (1, 0)


def test_pseudo_labels_are_chosen_after_smoothing(bridge_config: RunConfig, monkeypatch) -> None:
    # Every message's one neighbour is the first pool message, at full weight: all take its labels.
    def first_message(cfg: RunConfig, backbone: str, texts: list[str], device: torch.device) -> np.ndarray:
        return np.zeros((len(texts), 1), dtype=np.int64)

    monkeypatch.setattr(self_training, "pool_neighbours", first_message)
    settings = {
        "semi_supervised.student_epochs": 1,
        "semi_supervised.threshold": 0.0,
        "semi_supervised.neighbours": 1,
        "semi_supervised.neighbour_weight": 1.0,
    }
    (first,) = run_training(with_settings(bridge_config, **settings)).semi_supervised["rounds"]
    assert first["smoothed"] > 0.2  # the pool spans several intents
    assert first["per_intent"]["max"] == first["pseudo_labels"]  # every kept row has the first's


def test_student_learns_what_only_the_pool_teaches(bridge_config: RunConfig) -> None:
    # Hard targets: the teacher is right on 90% of this pool but unsure (top probability 0.51
    # on average). Matching such soft rows, where the labelled rows made each seen word a sure
    # sign, the tiny student learns to pull each new word away from its own intent: validation
    # accuracy peaks at the second epoch, then falls to nothing.
    result = run_training(with_settings(bridge_config, **{"semi_supervised.targets": "hard"}))
    record = result.semi_supervised
    assert record is not None
    teacher, student = record["teachers"][0]["best_valid"], record["rounds"][-1]["best_valid"]
    # The teacher never saw the validation words; the student learnt them from the pool.
    assert student >= teacher + 0.25 and student >= 0.75, (teacher, student)
    kept = record["rounds"][0]
    assert 0 < kept["pseudo_labels"] <= kept["pool"] and kept["agreement_with_teacher"] > 0.8
    off = run_training(with_settings(bridge_config, **{"semi_supervised.enabled": False}))
    assert off.semi_supervised is None and off.fit.best_metric == pytest.approx(teacher)


def test_self_training_is_seeded_and_teachers_are_cached(bridge_config: RunConfig, caplog) -> None:
    caplog.set_level(logging.INFO, logger="transferdesk")
    cfg = with_settings(bridge_config, **{"semi_supervised.student_epochs": 2, "semi_supervised.teachers": 2})
    first = run_training(cfg)
    teachers = sorted((Path(cfg.output) / "teachers").iterdir())
    assert len(teachers) == 2
    caplog.clear()
    again = run_training(cfg)
    assert caplog.text.count("reusing teacher labels") == 2
    assert torch.equal(first.model.network.head.weight, again.model.network.head.weight)
    assert sorted((Path(cfg.output) / "teachers").iterdir()) == teachers
    one = run_training(with_settings(cfg, **{"semi_supervised.teachers": 1}))  # the first teacher again
    assert one.semi_supervised["teachers"][0]["labels"] in {f"teachers/{t.name}" for t in teachers}
    assert len(list((Path(cfg.output) / "teachers").iterdir())) == 2


def test_damaged_teacher_labels_are_set_aside(bridge_config: RunConfig) -> None:
    cfg = with_settings(bridge_config, **{"semi_supervised.student_epochs": 1})
    run_training(cfg)
    (entry,) = (Path(cfg.output) / "teachers").iterdir()
    (entry / "pool.json").write_text('["tampered"]')
    run_training(cfg)
    assert Registry(cfg.output).teacher_labels(entry.name) is not None  # labelled again
    assert any(p.name.startswith(".damaged-") for p in entry.parent.iterdir())


def test_a_larger_teacher_teaches_a_student_of_the_served_shape(
    bridge_config: RunConfig, tmp_path: Path
) -> None:
    wide = make_tiny_backbone(tmp_path / "wide-bert", BRIDGE_WORDS, width=48, layers=3)
    cfg = with_settings(
        bridge_config, **{"semi_supervised.student_epochs": 1, "semi_supervised.teacher_backbone": str(wide)}
    )
    version = open_version(train_and_register(cfg).path)
    record = version.metrics["semi_supervised"]
    assert record["settings"]["teacher_backbone"] == "wide-bert"
    assert [t["backbone"] for t in record["teachers"]] == ["wide-bert"]
    assert version.config.semi_supervised.teacher_backbone == "wide-bert"
    assert "1 teacher(s) fine-tuned from `wide-bert`" in version.card
    # The student, the model that is served, keeps model.backbone's shape.
    assert IntentModel.load(version.path).network.encoder.config.hidden_size == 32
    # The student's own encoder teaches otherwise: a teacher of its own, cached apart.
    run_training(with_settings(cfg, **{"semi_supervised.teacher_backbone": None}))
    registry = Registry(cfg.output)
    cached = [registry.teacher_labels(d.name) for d in (registry.root / "teachers").iterdir()]
    assert sorted(t.info["backbone"] for t in cached) == sorted(["wide-bert", Path(cfg.model.backbone).name])


def test_a_missing_teacher_backbone_is_refused_before_training(bridge_config: RunConfig) -> None:
    cfg = with_settings(bridge_config, **{"semi_supervised.teacher_backbone": "./no-such-model"})
    with pytest.raises(TransferDeskError, match="no-such-model is neither a model directory nor a hub id"):
        train_and_register(cfg)
    assert not (Path(cfg.output) / "teachers").exists() and not list(Path(cfg.output).glob("*/v*"))


def test_version_records_the_pool_and_rounds(bridge_config: RunConfig) -> None:
    settings = {
        "semi_supervised.student_epochs": 1,
        "semi_supervised.rounds": 2,
        "semi_supervised.neighbours": 5,
    }
    cfg = with_settings(bridge_config, **settings)
    version = open_version(train_and_register(cfg).path)
    record = version.metrics["semi_supervised"]
    assert record["pool"]["file"] == "pool.txt" and record["pool"]["rows_used"] > 0
    assert [r["round"] for r in record["rounds"]] == [1, 2]
    assert record["settings"]["neighbours"] == 5 and all(0 <= r["smoothed"] < 0.5 for r in record["rounds"])
    assert version.config.data.unlabelled == "pool.txt"
    assert (
        "Unlabelled pool: `pool.txt`" in version.card and "Pseudo-labels kept per round (and" in version.card
    )
    assert "each message's probabilities mixed with its 5 nearest" in version.card
    assert {"teacher_seconds", "student_seconds"} <= set(version.metrics)


def test_unreachable_threshold_is_refused(bridge_config: RunConfig) -> None:
    with pytest.raises(TransferDeskError, match=r"no pool message reaches the pseudo-label threshold 0\.99"):
        run_training(with_settings(bridge_config, **{"semi_supervised.threshold": 0.99}))


def test_bad_pools_stop_the_cli_before_training(tmp_path: Path, capsys) -> None:
    from transferdesk.cli.main import main

    registry = tmp_path / "registry"
    wrong_column = write_csv(tmp_path / "pool.csv", [("where is it", "x")], header=("message", "id"))
    cases = [
        (["--data.unlabelled", "sample:retail/test.csv"], "240 of 240 messages are validation or test texts"),
        (["--data.unlabelled", str(wrong_column)], "missing column(s) text; the file has message, id"),
        (["--data.unlabelled", str(tmp_path / "nope.txt")], "not found"),
    ]
    for flags, message in cases:
        assert main(["train", "--output", str(registry), *flags]) == 2
        assert message in capsys.readouterr().err
    assert not [p for p in registry.rglob("*") if p.is_file()]  # nothing trained, nothing written


def test_cached_pool_keeps_line_breaks_inside_messages(bridge_config: RunConfig, tmp_path: Path) -> None:
    import json

    from transferdesk.data import load_splits

    pool = tmp_path / "pool.jsonl"
    messages = ["parcel courier\r\nplease", "login\nlocked account", "refund repay"]
    pool.write_text("\n".join(json.dumps({"text": m}) for m in messages) + "\n")
    cfg = with_settings(bridge_config, **{"data.unlabelled": str(pool)})
    splits = load_splits(cfg.data, cfg.runtime.seed)
    registry = Registry(cfg.output)
    registry.save_teacher_labels("k", splits.pool.texts, np.eye(3, dtype=np.float32), {"labels": ["a"]})
    record = registry.teacher_labels("k")
    assert record is not None and record.texts == splits.pool.texts == messages
    assert record.probs.shape == (3, 3)


def test_teacher_key_tells_a_random_control_from_the_pretrained_backbone(bridge_config: RunConfig) -> None:
    from transferdesk.data import Pool
    from transferdesk.training.recipes.self_training import teacher_key

    train = Dataset(["a b"], ["x"])
    pool = Pool(["c"], "pool.txt", "0" * 64, 1)
    keys = {
        teacher_key(bridge_config, bridge_config.model.backbone, train, train, pool, 13, p)
        for p in (True, False)
    }
    assert len(keys) == 2


def test_teacher_key_counts_out_of_scope_rows_only_where_teachers_learn_from_them(
    bridge_config: RunConfig,
) -> None:
    from transferdesk.data import Pool
    from transferdesk.training.recipes.self_training import teacher_key

    train, pool = Dataset(["a b"], ["x"]), Pool(["c"], "pool.txt", "0" * 64, 1)

    def key(cfg: RunConfig, outliers: list[str]) -> str:
        return teacher_key(cfg, cfg.model.backbone, train, train, pool, 13, True, outliers)

    assert key(bridge_config, ["weather"]) == key(bridge_config, [])  # weight 0: not trained on
    doubting = bridge_config.model_copy(
        update={"training": bridge_config.training.model_copy(update={"outlier_weight": 0.5})}
    )
    assert key(doubting, ["weather"]) != key(doubting, [])
