"""Hand-offs that hold two emerging intents (gift cards, crypto wallets) and some noise, and a
tiny served model whose embeddings tell them apart: for the clustering's tests, the page's and
the command line's."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import TOY_INTENTS, make_tiny_backbone, tiny_run, toy_rows, write_csv
from transferdesk.registry import ModelVersion
from transferdesk.review.store import Capture, Store

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
FILLERS = ["my", "the", "please", "now", "help", "again", "is", "with"]
# Each group: one message per filler, the same three content words around it.
GIFT_CARDS = [f"gift card balance {w}" for w in FILLERS]
CRYPTO = [f"bitcoin wallet {w} exchange" for w in FILLERS]
NOISE = [
    "weather",
    "pizza football music holiday train cat garden movie",
    "zzz",
    "book about the cat in the garden with music",
]
CLUSTER_WORDS = {w for text in [*GIFT_CARDS, *CRYPTO, *NOISE] for w in text.split()}


def add_handoffs(store: Store, now: datetime = NOW) -> dict[str, int]:
    """Captures GIFT_CARDS, CRYPTO and NOISE as hand-offs, plus one message served without a
    hand-off (sampled, never clustered); returns {text: message id}. The gift-card messages
    arrive in the last day (6) and the day before (2): the group is growing; the crypto ones
    are all older than two days."""
    ages = [timedelta(hours=h) for h in (1, 2, 3, 4, 5, 6, 30, 40)]
    rows = [(text, now - age, "low_confidence") for text, age in zip(GIFT_CARDS, ages, strict=True)]
    rows += [(text, now - timedelta(days=3, minutes=i), "out_of_scope") for i, text in enumerate(CRYPTO)]
    rows += [(text, now - timedelta(hours=10), "out_of_scope") for text in NOISE]
    rows.append(("gift card balance please sampled", now, "sample"))
    store.add(
        [
            Capture(
                f"req-{i}",
                at,
                "registry/northwind/v1",
                text,
                [("refund_status", 0.4), ("track_order", 0.35)],
                reason == "out_of_scope",
                reason,
                "human-agents",
            )
            for i, (text, at, reason) in enumerate(rows)
        ]
    )
    return {m.text: m.id for m in store.pending(100)}


@pytest.fixture(scope="session")
def cluster_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    words = CLUSTER_WORDS | {w for texts in TOY_INTENTS.values() for t in texts for w in t.split()}
    return make_tiny_backbone(tmp_path_factory.mktemp("cluster-bert"), words)


@pytest.fixture(scope="session")
def served_version(cluster_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelVersion:
    """A tiny version trained on the toy intents (track_order, reset_password, refund_status)
    and published to a registry: the model `review --model` names."""
    from transferdesk.training.train import train_and_register

    root = tmp_path_factory.mktemp("served")
    files = {
        "train": write_csv(root / "train.csv", toy_rows(0, 4)),
        "valid": write_csv(root / "valid.csv", [*toy_rows(4, 6), ("weather today", "oos")]),
    }
    cfg = tiny_run(cluster_backbone, files, root / "registry", **{"training.epochs": 2, "name": "northwind"})
    return train_and_register(cfg)
