"""Shared fixtures: a tiny randomly initialised BERT saved as a local model directory, and
small data files. Unit tests train it in seconds; integration tests use the real backbone."""

from __future__ import annotations

import os

# No network in tests: hub look-ups must fail at once, not after connection time-outs.
# Set before anything imports huggingface_hub, which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Seeded GPU runs repeat exactly only when cuBLAS starts with this (see trainer.configure_runtime);
# a test that touched the GPU before training would otherwise start it without.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import contextlib
import csv
import itertools
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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


def make_tiny_backbone(path: Path, words: set[str] | None = None, width: int = 32, layers: int = 2) -> Path:
    """A 2-layer, 32-wide BERT (or as given) with its tokenizer (whole words: those of
    TOY_INTENTS, or `words`), saved like any Hugging Face model."""
    torch.manual_seed(0)
    vocab = _vocab(words)
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * width,
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


@pytest.fixture(scope="session")
def toy_version(tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A published toy version, calibrated for two requests in a message too; for tests that
    only read it."""
    from transferdesk.training.train import train_and_register

    tmp = tmp_path_factory.mktemp("toy-version")
    files = {
        "train": write_csv(tmp / "train.csv", toy_rows(0, 5)),
        "valid": write_csv(tmp / "valid.csv", [*toy_rows(5, 8), ("weather today", "oos")]),
    }
    cfg = tiny_run(tiny_backbone, files, tmp / "registry", **{"calibration.multi_intent_rows": 50})
    return train_and_register(cfg).path


# PostgreSQL, for the review store's tests: Debian's server (`apt-get install postgresql`,
# which .ci/run does), started once per session on a free loopback port, in a directory of
# its own. initdb refuses to run as root, so as root it runs as the `postgres` user.
PG_ROOT = Path("/usr/lib/postgresql")
_databases = itertools.count(1)


def _pg_bin() -> Path | None:
    versions = sorted(PG_ROOT.glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name))
    return versions[-1].parent if versions else None


@dataclass
class Postgres:
    bin: Path
    data: Path
    port: int

    def _run(self, *args: str) -> None:
        as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*as_user, *args], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data.parent} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.data.parent / "server.log")  # not our pipe: the server outlives pg_ctl
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", log, "-o", options, "-w", "start")

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://transferdesk@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database: its URL."""
        import psycopg

        name = f"test_{next(_databases)}"
        dsn = f"host=127.0.0.1 port={self.port} user=transferdesk dbname=postgres"
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    pg_bin = _pg_bin()
    if pg_bin is None:
        pytest.fail("no PostgreSQL server: apt-get install postgresql (.ci/run installs it)")
    # Not under pytest's temporary root: that is private to root, and the server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="transferdesk-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = Postgres(pg_bin, root / "data", port)
    server._run(str(pg_bin / "initdb"), "-D", str(server.data), "-U", "transferdesk", "--auth=trust")
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):  # a test stopped it
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty review store: a SQLite file, or a database of the session's PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'capture.db'}"
    return request.getfixturevalue("postgres").new_database()


# A task where only the pool links the words the test uses to the intents. Labelled rows use
# each intent's "seen" words; validation and test rows use its "pool-only" words, which a
# model trained on the labels alone has never met; pool messages mix both. A teacher labels
# the pool by its seen words, and a student trained on those labels learns the new words.
SEEN = {"track": ["parcel", "package"], "password": ["password", "login"], "refund": ["refund", "money"]}
NEW = {"track": ["courier", "delivery"], "password": ["locked", "account"], "refund": ["repay", "reimburse"]}
FILLER = ["my", "the", "please", "now", "help", "again"]
BRIDGE_WORDS = {w for vocab in (*SEEN.values(), *NEW.values()) for w in vocab} | set(FILLER)


def _rows(
    first: dict[str, list[str]], second: dict[str, list[str]], n: int, rng: np.random.Generator
) -> list[tuple[str, str]]:
    """n rows per intent: a word of `first`, a word of `second`, two fillers, shuffled."""
    rows = []
    for intent in first:
        for _ in range(n):
            words = [rng.choice(first[intent]), rng.choice(second[intent]), *rng.choice(FILLER, 2)]
            rows.append((" ".join(rng.permutation(words).tolist()), intent))
    return rows


@pytest.fixture(scope="module")
def bridge_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_backbone(tmp_path_factory.mktemp("bridge-bert"), BRIDGE_WORDS)


@pytest.fixture
def bridge_config(bridge_backbone: Path, tmp_path: Path) -> RunConfig:
    rng = np.random.default_rng(0)
    pool = tmp_path / "pool.txt"
    pool.write_text("\n".join(sorted({t for t, _ in _rows(SEEN, NEW, 60, rng)})) + "\n")
    files = {
        "train": write_csv(tmp_path / "train.csv", sorted(set(_rows(SEEN, SEEN, 6, rng)))),
        "valid": write_csv(tmp_path / "valid.csv", sorted(set(_rows(NEW, NEW, 20, rng)))),
        "unlabelled": pool,
    }
    return tiny_run(
        bridge_backbone,
        files,
        tmp_path / "registry",
        **{"semi_supervised.student_epochs": 15, "semi_supervised.threshold": 0.4},
    )


def with_settings(cfg: RunConfig, **overrides: object) -> RunConfig:
    """`cfg` with some `section.field` settings changed, validated again."""
    data = cfg.model_dump()
    for dotted, value in overrides.items():
        section, name = dotted.split(".")
        data[section][name] = value
    return RunConfig.model_validate(data)
