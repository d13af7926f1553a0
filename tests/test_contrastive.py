"""Contrastive pre-training on the unlabelled pool, with the tiny in-test BERT."""

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from tests.conftest import BRIDGE_WORDS, make_tiny_backbone, with_settings
from transferdesk.config import ModelConfig, RunConfig
from transferdesk.data import load_splits
from transferdesk.model.modeling import IntentModel
from transferdesk.registry import Registry, open_version
from transferdesk.training.losses import self_contrastive
from transferdesk.training.recipes import self_training
from transferdesk.training.recipes.contrastive import contrastive_key, contrastive_stage
from transferdesk.training.recipes.self_training import self_train
from transferdesk.training.train import run_training, train_and_register
from transferdesk.training.trainer import configure_runtime


def _mean_similarity(backbone: str, texts: list[str]) -> float:
    """Mean cosine similarity between the sentence vectors of different messages."""
    model = IntentModel.from_backbone(backbone, ["x"], ModelConfig(max_length=16))
    batch = model.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        z = torch.nn.functional.normalize(
            model.network.embed(batch["input_ids"], batch["attention_mask"]), dim=-1
        )
    sim = (z @ z.T).numpy()
    return float(sim[~np.eye(len(texts), dtype=bool)].mean())


def test_self_contrastive_rewards_finding_ones_own_view() -> None:
    torch.manual_seed(0)
    a = torch.randn(8, 16)
    own = self_contrastive(a, a + 0.01 * torch.randn(8, 16), 0.05)
    others = self_contrastive(a, a[torch.randperm(8)], 0.05)
    assert own < 0.01 < others


def test_pre_training_spreads_the_pool_apart_and_is_cached(bridge_config: RunConfig, caplog) -> None:
    caplog.set_level(logging.INFO, logger="transferdesk")
    cfg = with_settings(bridge_config, **{"contrastive.epochs": 3, "contrastive.lr": 1e-3})
    device = configure_runtime(cfg.runtime)
    pool = load_splits(cfg.data, cfg.runtime.seed).pool
    adapted = contrastive_stage(cfg, cfg.model.backbone, pool, device)
    assert Path(adapted).parent.name == "sources"
    # A random encoder puts every message in nearly the same direction; the stage, made to
    # tell each message from the rest of its batch, spreads them apart.
    texts = pool.texts[:64]
    before, after = _mean_similarity(cfg.model.backbone, texts), _mean_similarity(adapted, texts)
    assert after < before - 0.2, (before, after)
    caplog.clear()
    assert contrastive_stage(cfg, cfg.model.backbone, pool, device) == adapted
    assert "reusing the pool-adapted encoder" in caplog.text
    # Another pool, setting or seed is another encoder.
    keys = {
        contrastive_key(cfg, cfg.model.backbone, pool),
        contrastive_key(with_settings(cfg, **{"contrastive.temperature": 0.1}), cfg.model.backbone, pool),
        contrastive_key(with_settings(cfg, **{"runtime.seed": 14}), cfg.model.backbone, pool),
        contrastive_key(cfg, cfg.model.backbone, replace(pool, texts=pool.texts[1:])),
        # training's own settings that the stage uses too
        contrastive_key(with_settings(cfg, **{"training.warmup_ratio": 0.2}), cfg.model.backbone, pool),
    }
    assert len(keys) == 5
    # A pool of one message has nothing to be told apart from: no stage, no encoder.
    assert contrastive_stage(cfg, cfg.model.backbone, replace(pool, texts=pool.texts[:1]), device) is None


def test_pool_used_only_for_pre_training(bridge_config: RunConfig) -> None:
    cfg = with_settings(
        bridge_config,
        **{"contrastive.epochs": 1, "semi_supervised.pseudo_labels": False},
    )
    version = open_version(train_and_register(cfg).path)
    record = version.metrics["semi_supervised"]
    assert record["contrastive_encoder"].startswith("sources/")
    assert record["teachers"] == [] and record["rounds"] == []
    assert not (Path(cfg.output) / "teachers").exists()
    assert (
        "contrastive pre-training on it first (1 epoch(s)" in version.card and "teacher" not in version.card
    )
    assert {"contrastive_seconds", "train_seconds"} <= set(version.metrics)
    assert "teacher_seconds" not in version.metrics
    # Rerun: the stage now comes from the cache, and the model is the same to the last bit.
    again = run_training(cfg)
    first = IntentModel.load(version.path).network.head.weight
    assert torch.equal(first, again.model.network.head.weight.detach().cpu())


def test_teachers_and_student_fine_tune_the_adapted_encoder(bridge_config: RunConfig, monkeypatch) -> None:
    cfg = with_settings(bridge_config, **{"contrastive.epochs": 1, "semi_supervised.student_epochs": 1})
    students: list[str] = []

    def student(cfg: RunConfig, backbone: str, *args, **kwargs):
        students.append(backbone)
        return self_train(cfg, backbone, *args, **kwargs)

    monkeypatch.setattr(self_training, "self_train", student)
    result = run_training(cfg)
    record = result.semi_supervised
    adapted = record["contrastive_encoder"]
    teacher = Registry(cfg.output).teacher_labels(Path(record["teachers"][0]["labels"]).name)
    assert teacher.info["backbone"] == adapted
    assert teacher.info["pool"]["file"] == "pool.txt"  # the file's name, not this machine's path
    assert students == [str(Path(cfg.output) / adapted)]
    # That encoder is not the backbone's: the stage trained it.
    original = IntentModel.from_backbone(cfg.model.backbone, ["x"], cfg.model).network.encoder
    pretrained = IntentModel.from_backbone(str(Path(cfg.output) / adapted), ["x"], cfg.model).network.encoder
    assert not torch.equal(
        original.embeddings.word_embeddings.weight, pretrained.embeddings.word_embeddings.weight
    )


def test_a_larger_teacher_is_fine_tuned_as_it_is(bridge_config: RunConfig, tmp_path: Path) -> None:
    wide = make_tiny_backbone(tmp_path / "wide-bert", BRIDGE_WORDS, width=48, layers=3)
    cfg = with_settings(
        bridge_config,
        **{
            "contrastive.epochs": 1,
            "semi_supervised.student_epochs": 1,
            "semi_supervised.teacher_backbone": str(wide),
        },
    )
    record = run_training(cfg).semi_supervised
    assert record["contrastive_encoder"].startswith("sources/")
    assert [t["backbone"] for t in record["teachers"]] == ["wide-bert"]


def test_a_pool_left_without_a_use_is_refused() -> None:
    with pytest.raises(ValidationError, match="leave the pool unused"):
        RunConfig(semi_supervised={"pseudo_labels": False})
    cfg = RunConfig(semi_supervised={"pseudo_labels": False}, contrastive={"epochs": 1})
    assert cfg.contrastive.epochs == 1
    # the pool is ignored anyway
    assert not RunConfig(semi_supervised={"enabled": False, "pseudo_labels": False}).semi_supervised.enabled
