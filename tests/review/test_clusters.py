"""Emerging intents: HDBSCAN finds dense groups and leaves the rest as noise, deterministically;
clusters of a store's hand-offs are described (growth, representatives, words, nearest intents)
and named as ordinary reviews, which the export takes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from tests.review.conftest import CRYPTO, GIFT_CARDS, NOISE, NOW, add_handoffs
from transferdesk.cli.main import main
from transferdesk.config import ModelConfig
from transferdesk.errors import TransferDeskError
from transferdesk.model.modeling import IntentModel
from transferdesk.registry import ModelVersion
from transferdesk.review.clusters import (
    NOISE as NOISE_LABEL,
)
from transferdesk.review.clusters import (
    ClusterCache,
    UnknownCluster,
    UnknownIntent,
    cluster_embeddings,
    distinctive_words,
    find_clusters,
    name_cluster,
)
from transferdesk.review.config import ClusterSettings, ReviewConfig
from transferdesk.review.export import export_reviews
from transferdesk.review.store import Store

SETTINGS = ClusterSettings(min_cluster_size=4)
REASONS = ReviewConfig().clusters.reasons


def _blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three tight groups of 30 in a 384-wide space, their centres near one direction (as
    sentence embeddings are), and 8 points in random directions (label -1), in random order."""
    rng = np.random.default_rng(seed)
    centres = 2 * rng.normal(size=384) + rng.normal(size=(3, 384))
    points = [centre + rng.normal(scale=0.05, size=(30, 384)) for centre in centres]
    truth = np.repeat([0, 1, 2], 30)
    rows, labels = np.vstack([*points, rng.normal(size=(8, 384))]), np.r_[truth, np.full(8, -1)]
    order = rng.permutation(len(rows))
    return rows[order] * rng.uniform(0.5, 3, size=(len(rows), 1)), labels[order]  # lengths: any


@pytest.mark.parametrize("dimensions", [32, None])
def test_separated_groups_are_found_and_scattered_points_left_as_noise(dimensions: int | None) -> None:
    rows, truth = _blobs()
    settings = ClusterSettings(min_cluster_size=5, dimensions=dimensions)
    labels = cluster_embeddings(rows, settings)
    grouped = truth != -1
    assert adjusted_rand_score(truth[grouped], labels[grouped]) == 1.0
    assert (labels[~grouped] == NOISE_LABEL).all()
    assert np.array_equal(labels, cluster_embeddings(rows.copy(), settings))  # deterministic


def test_too_few_rows_are_all_noise() -> None:
    rows, _ = _blobs()
    assert (cluster_embeddings(rows[:4], ClusterSettings(min_cluster_size=5)) == NOISE_LABEL).all()
    assert cluster_embeddings(rows[:0], ClusterSettings()).shape == (0,)


def test_distinctive_words_leave_out_stop_words_and_redaction_tokens() -> None:
    texts = [
        "my gift card [NUMBER] balance",
        "the gift card code",
        "is my bitcoin wallet [EMAIL] here",
        "bitcoin wallet please",
        "card?",
    ]
    words = distinctive_words(texts, np.array([0, 0, 1, 1, -1]), 3)
    # "card" as often as "gift", but the noise has it too.
    assert words[0] == ["gift", "card", "balance"] and words[1] == ["bitcoin", "wallet"]
    assert distinctive_words(["the", "is"], np.array([0, 0]), 3) == {0: []}


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'capture.db'}")
    store.migrate()
    return store


def _found(model: IntentModel, store: Store) -> dict[str, object]:
    clusters = find_clusters(model, store.handoffs(REASONS, 100), SETTINGS, NOW)
    return {frozenset(m.text for m in c.members): c for c in clusters}


def test_hand_offs_cluster_by_meaning_in_the_served_model_and_are_described(
    served_version: ModelVersion, store: Store
) -> None:
    ids = add_handoffs(store)
    model = IntentModel.from_pretrained(served_version, runtime="torch")
    found = _found(model, store)
    assert found.keys() == {frozenset(GIFT_CARDS), frozenset(CRYPTO)}  # the noise in neither
    gift, crypto = found[frozenset(GIFT_CARDS)], found[frozenset(CRYPTO)]
    assert (gift.size, gift.recent, gift.previous) == (8, 6, 2)  # growing
    assert (crypto.size, crypto.recent, crypto.previous) == (8, 0, 0)
    assert set(gift.words[:3]) == {"gift", "card", "balance"}
    assert [intent for intent, _ in gift.nearest] and len(gift.nearest) == SETTINGS.nearest
    assert {intent for intent, _ in gift.nearest} <= set(model.labels)
    similarities = [m.similarity for m in gift.members]
    assert similarities == sorted(similarities, reverse=True)  # representatives first
    assert {m.id for m in gift.members} == {ids[t] for t in GIFT_CARDS}
    assert gift.last_seen == max(m.captured_at for m in gift.members)
    # The same hand-offs give the same clusters, ids included: list in one process, name in another.
    again = _found(IntentModel.from_pretrained(served_version, runtime="torch"), store)
    assert [c.id for c in again.values()] == [c.id for c in found.values()]
    # A cluster that changed is another cluster; one that did not keeps its id.
    after = {c.id for c in _found(model, _without(store, CRYPTO[0])).values()}
    assert gift.id in after and crypto.id not in after and len(after) == 2


def _without(store: Store, text: str) -> Store:
    message = next(m for m in store.pending(100) if m.text == text)
    store.review(message.id, "ana", "skip")
    return store


def test_a_model_without_centroids_is_compared_by_its_head(tiny_backbone: Path, store: Store) -> None:
    add_handoffs(store)
    labels = ["track_order", "reset_password", "refund_status"]
    model = IntentModel.from_backbone(str(tiny_backbone), labels, ModelConfig(max_length=16))
    clusters = find_clusters(model, store.handoffs(REASONS, 100), ClusterSettings(min_cluster_size=2), NOW)
    assert clusters and all({i for i, _ in c.nearest} <= set(labels) for c in clusters)
    assert find_clusters(model, [], SETTINGS) == []


def test_naming_a_cluster_records_reviews_the_export_takes(
    served_version: ModelVersion, store: Store, tmp_path: Path
) -> None:
    ids = add_handoffs(store)
    model = IntentModel.from_pretrained(served_version, runtime="torch")
    found = _found(model, store)
    gift, crypto = found[frozenset(GIFT_CARDS)], found[frozenset(CRYPTO)]
    known = model.labels
    with pytest.raises(UnknownIntent, match="not an intent the model knows"):
        name_cluster(store, gift, "gift_cards", "ana", known)
    with pytest.raises(TransferDeskError, match="has no message 999"):
        name_cluster(store, gift, "gift_cards", "ana", known, exclude=[999], new_intent=True)
    store.review(ids[GIFT_CARDS[1]], "ben", "out_of_scope")  # meanwhile, from the queue
    named = name_cluster(
        store, gift, "gift_cards", "ana", known, exclude=[ids[GIFT_CARDS[0]]], new_intent=True
    )
    assert named.action == "correct" and named.skipped == [ids[GIFT_CARDS[1]]]
    assert sorted(named.recorded) == sorted(ids[t] for t in GIFT_CARDS[2:])
    assert store.new_intents() == ["gift_cards"]
    assert name_cluster(store, crypto, "oos", "ana", known).action == "out_of_scope"

    done = export_reviews(store, tmp_path / "reviewed.csv", tmp_path / "pool.csv")
    with open(tmp_path / "reviewed.csv", newline="", encoding="utf-8") as f:
        exported = {row["text"]: row["label"] for row in csv.DictReader(f)}
    assert exported == {
        **{text: "gift_cards" for text in GIFT_CARDS[2:]},
        GIFT_CARDS[1]: "oos",  # ben's review kept
        **{text: "oos" for text in CRYPTO},
    }
    assert done.pool == len(NOISE) + 2  # the excluded one, the noise and the sampled one


def test_the_cache_clusters_again_only_when_the_hand_offs_change(
    served_version: ModelVersion, store: Store
) -> None:
    ids = add_handoffs(store)
    model = IntentModel.from_pretrained(served_version, runtime="torch")
    embedded: list[int] = []
    embed = model.embed

    def counted(texts: list[str], *args: object, **kwargs: object) -> np.ndarray:
        embedded.append(len(texts))
        return embed(texts, *args, **kwargs)

    model.embed = counted  # type: ignore[method-assign]
    cache = ClusterCache(store, SETTINGS, lambda: model)
    listed = cache.current()
    assert cache.current() is listed and embedded == [len(GIFT_CARDS) + len(CRYPTO) + len(NOISE)]
    assert listed.messages == 20 and listed.noise == len(NOISE)
    gift = next(c for c in listed.clusters if ids[GIFT_CARDS[0]] in {m.id for m in c.members})
    store.review(ids[CRYPTO[0]], "ben", "skip")
    assert cache.find(gift.id) is gift  # as listed, though the hand-offs changed since
    again = cache.current()
    assert again is not listed and again.messages == 19 and len(embedded) == 1  # none embedded again
    assert cache.current(refresh=True) is not again and len(embedded) == 1
    add_handoffs(store)  # 20 more: only they are embedded
    assert cache.current().messages == 39 and embedded == [20, 20]
    with pytest.raises(UnknownCluster, match="list them again"):
        cache.find("00000000")


def test_the_command_line_lists_clusters_then_names_one(
    served_version: ModelVersion, store: Store, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ids = add_handoffs(store)
    review = ["review", "--store", store.url, "--model", str(served_version.path)]
    small = ["--clusters.min_cluster_size", "4"]
    assert main([*review[:3], "clusters"]) == 2
    assert "needs the served model: --model" in capsys.readouterr().err

    assert main([*review, "clusters", *small]) == 0
    out = capsys.readouterr().out
    assert "20 unreviewed hand-offs: 2 clusters, 4 in none" in out and "gift card balance" in out
    assert main([*review, "clusters", *small, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["clusters"]
    gift = next(c for c in listed if ids[GIFT_CARDS[0]] in {m["id"] for m in c["members"]})
    assert gift["words"][:3] and gift["nearest"] and gift["recent"] == 6

    name = [*review, "name-cluster", gift["id"], *small, "--intent", "gift_cards", "--by", "ana"]
    assert main(name) == 2 and "add --new-intent" in capsys.readouterr().err
    assert main([*name, "--new-intent", "--exclude", str(ids[GIFT_CARDS[0]])]) == 0
    assert "7 messages reviewed as 'gift_cards'" in capsys.readouterr().out
    assert {m.text: r.label for m, r in store.latest_reviews()} == {t: "gift_cards" for t in GIFT_CARDS[1:]}
    assert main(name) == 2  # the clusters moved on: that one is gone
    assert "list them again" in capsys.readouterr().err

    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    assert main(["review", "--store", empty, "--model", str(served_version.path), "clusters"]) == 2
    assert "no unreviewed hand-offs" in capsys.readouterr().err
