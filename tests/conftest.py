"""Shared fixtures: a tiny randomly initialised BERT saved as a local model directory, and
small data files. Unit tests train it in seconds; integration tests use the real backbone."""

from __future__ import annotations

import os

# No network in tests: hub look-ups must fail at once, not after connection time-outs.
# Set before anything imports huggingface_hub, which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import csv
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizer

from transferdesk.config import RunConfig, load_config

# Three intents whose utterances share no content words, so even a tiny model separates them.
TOY_INTENTS = {
    "track_order": [
        "where is my parcel",
        "track my parcel please",
        "parcel tracking status",
        "has my parcel shipped",
        "parcel still not here",
        "when will the parcel come",
        "my parcel tracking please",
        "parcel not here still",
    ],
    "reset_password": [
        "forgot my password",
        "reset password now",
        "password reset link",
        "cannot remember password",
        "change my password please",
        "password not working",
        "my password is not working",
        "password reset please",
    ],
    "refund_status": [
        "where is my refund",
        "refund still missing",
        "refund status please",
        "when is the refund due",
        "refund not received",
        "check refund money",
        "my refund money please",
        "refund still not here",
    ],
}
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _vocab(words: set[str] | None = None) -> list[str]:
    words = sorted(words or {w for texts in TOY_INTENTS.values() for t in texts for w in t.split()})
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    return SPECIAL + words + letters + [f"##{c}" for c in letters] + ["oos", "weather", "today"]


def make_tiny_backbone(path: Path, words: set[str] | None = None) -> Path:
    """A 2-layer, 32-wide BERT with its tokenizer (whole words: those of TOY_INTENTS, or
    `words`), saved like any Hugging Face model."""
    torch.manual_seed(0)
    vocab = _vocab(words)
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_backbone(tmp_path_factory.mktemp("tiny-bert"))


def write_csv(path: Path, rows: list[tuple[str, str]], header: tuple[str, str] = ("text", "label")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def toy_rows(start: int, stop: int) -> list[tuple[str, str]]:
    return [(t, label) for label, texts in TOY_INTENTS.items() for t in texts[start:stop]]


@pytest.fixture
def toy_files(tmp_path: Path) -> dict[str, Path]:
    """train (4 per intent), valid and test (2 per intent + 1 out-of-scope each)."""
    return {
        "train": write_csv(tmp_path / "train.csv", toy_rows(0, 4)),
        "valid": write_csv(tmp_path / "valid.csv", [*toy_rows(4, 6), ("weather today", "oos")]),
        "test": write_csv(tmp_path / "test.csv", [*toy_rows(6, 8), ("oos weather", "oos")]),
    }


def tiny_run(backbone: Path, files: dict[str, Path], output: Path, **overrides: object) -> RunConfig:
    """A run of the tiny model on toy data files that finishes in a few seconds."""
    settings = {
        "output": str(output),
        **{f"data.{split}": str(path) for split, path in files.items()},
        "model.backbone": str(backbone),
        "model.max_length": 16,
        "model.dropout": 0.0,
        "training.epochs": 10,
        "training.patience": 10,
        "training.batch_size": 4,
        "training.encoder_lr": 3e-4,
        "training.head_lr": 1e-2,
        "runtime.progress": False,
        "runtime.num_threads": 1,
    }
    return load_config(None, {**settings, **overrides})


@pytest.fixture
def tiny_config(tiny_backbone: Path, toy_files: dict[str, Path], tmp_path: Path) -> RunConfig:
    return tiny_run(tiny_backbone, toy_files, tmp_path / "registry")
