"""Emerging intents: the unreviewed hand-offs grouped by meaning, each group described so that a
reviewer can name it (a new intent, or an existing one it belongs to) in one go.

The messages are embedded by the served model (the space its head reads), L2-normalised so that
distances are cosine ones, reduced by PCA, and clustered by HDBSCAN, which finds groups of any
number and shape and leaves messages in no dense group as noise (-1), unclustered. A cluster is
described by its growth, the messages closest to its centre, its distinctive words (class-based
TF-IDF: one document per cluster) and the model's nearest intents. Its id is a digest of its
messages' ids: the same hand-offs clustered again give the same ids, so the command line can
list clusters in one process and name one in the next.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import numpy as np
from sklearn.cluster import HDBSCAN
from sklearn.decomposition import PCA
from sklearn.feature_extraction.text import CountVectorizer, TfidfTransformer
from sklearn.preprocessing import normalize

from transferdesk.errors import TransferDeskError
from transferdesk.review.config import ClusterSettings
from transferdesk.review.redaction import TOKENS
from transferdesk.review.store import Message, Store

if TYPE_CHECKING:
    from transferdesk.model.modeling import IntentModel

NOISE = -1
NO_MODEL = "clustering the hand-offs needs the served model: --model registry/<name>@production"
# Redaction's tokens ([NUMBER], [EMAIL], …) say nothing about what a message is about.
PLACEHOLDERS = re.compile("|".join(map(re.escape, TOKENS.values())))

__all__ = [
    "NO_MODEL",
    "Cluster",
    "ClusterCache",
    "ClusterSettings",
    "Clustering",
    "Member",
    "Named",
    "UnknownCluster",
    "UnknownIntent",
    "cluster_embeddings",
    "describe_clusters",
    "find_clusters",
    "name_cluster",
]


class UnknownCluster(TransferDeskError):
    """No cluster of the current clustering has that id."""


class UnknownIntent(TransferDeskError):
    """A name the model does not know, not confirmed as a new intent."""


@dataclass(frozen=True)
class Member:
    """One message of a cluster."""

    id: int
    text: str
    intent: str  # the model's
    reason: str
    captured_at: datetime
    similarity: float  # cosine to the cluster's centre


@dataclass(frozen=True)
class Cluster:
    id: str  # a digest of its messages' ids
    size: int
    recent: int  # messages captured in the last growth period
    previous: int  # in the period before it
    first_seen: datetime
    last_seen: datetime
    words: list[str]  # the most distinctive first
    nearest: list[tuple[str, float]]  # (intent, cosine to the cluster's centre), nearest first
    members: list[Member]  # the closest to the centre first: the first are its representatives


@dataclass(frozen=True)
class Clustering:
    """One clustering of a store's unreviewed hand-offs."""

    clusters: list[Cluster]
    messages: int  # hand-offs clustered
    noise: int  # of them, in no cluster
    computed_at: datetime

    def find(self, cluster_id: str) -> Cluster:
        for cluster in self.clusters:
            if cluster.id == cluster_id:
                return cluster
        raise UnknownCluster(
            f"no cluster {cluster_id} among the {len(self.clusters)} current ones: the hand-offs "
            "changed since it was listed (reviewed, or newly captured), and so did the clusters; "
            "list them again (`transferdesk review clusters`, or refresh the page)"
        )


@dataclass(frozen=True)
class Named:
    """What naming a cluster recorded."""

    cluster: str
    label: str
    action: str  # of the reviews recorded: correct, confirm, out_of_scope (or several, a/b; or none)
    recorded: list[int]  # the messages reviewed
    skipped: list[int]  # reviewed by someone else meanwhile: left as they were


def cluster_embeddings(embeddings: np.ndarray, settings: ClusterSettings) -> np.ndarray:
    """A cluster label per row of `embeddings` (0, 1, …), NOISE (-1) for rows in no cluster.
    Deterministic: the same rows give the same labels."""
    rows = len(embeddings)
    if rows < max(settings.min_cluster_size, settings.min_samples or 0, 2):
        return np.full(rows, NOISE)
    # Euclidean distance between unit vectors is a monotone function of their cosine.
    points = normalize(np.asarray(embeddings, dtype=np.float64))
    if settings.dimensions is not None and settings.dimensions < min(points.shape):
        # svd_solver="full": exact, so no random state to seed.
        points = PCA(n_components=settings.dimensions, svd_solver="full").fit_transform(points)
    hdbscan = HDBSCAN(
        min_cluster_size=settings.min_cluster_size,
        min_samples=settings.min_samples,
        cluster_selection_method=settings.selection,
        copy=False,  # the points are this function's own
    )
    return hdbscan.fit_predict(points)


def find_clusters(
    model: IntentModel, messages: Sequence[Message], settings: ClusterSettings, now: datetime | None = None
) -> list[Cluster]:
    """The clusters of `messages` in `model`'s embedding space, the largest first; growth is
    counted back from `now` (default: the current time)."""
    if not messages:
        return []
    return describe_clusters(model, messages, model.embed([m.text for m in messages]), settings, now)


def describe_clusters(
    model: IntentModel,
    messages: Sequence[Message],
    embeddings: np.ndarray,
    settings: ClusterSettings,
    now: datetime | None = None,
) -> list[Cluster]:
    """find_clusters, given the messages' embeddings by `model` (a row each)."""
    texts = [m.text for m in messages]
    unit = normalize(embeddings)
    labels = cluster_embeddings(unit, settings)
    words = distinctive_words(texts, labels, settings.words)
    intents = intent_directions(model)
    now = now or datetime.now(UTC)
    period = timedelta(hours=settings.growth_hours)
    clusters = []
    for label in sorted(set(labels.tolist()) - {NOISE}):
        rows = np.flatnonzero(labels == label)
        centre = normalize(unit[rows].mean(axis=0, keepdims=True))[0]
        closeness = unit[rows] @ centre
        order = np.argsort(-closeness, kind="stable")
        to_intents = intents @ centre
        nearest = np.argsort(-to_intents, kind="stable")[: settings.nearest]
        times = [messages[i].captured_at for i in rows]
        clusters.append(
            Cluster(
                id=cluster_id(messages[i].id for i in rows),
                size=len(rows),
                recent=sum(t > now - period for t in times),
                previous=sum(now - 2 * period < t <= now - period for t in times),
                first_seen=min(times),
                last_seen=max(times),
                words=words[label],
                nearest=[(model.labels[j], round(float(to_intents[j]), 4)) for j in nearest],
                members=[_member(messages[rows[k]], float(closeness[k])) for k in order],
            )
        )
    return sorted(clusters, key=lambda c: (-c.size, c.id))


def cluster_id(message_ids: Iterable[int]) -> str:
    """8 hex digits naming a set of messages, whatever their order."""
    joined = ",".join(map(str, sorted(message_ids)))
    return hashlib.blake2b(joined.encode(), digest_size=4).hexdigest()


def _member(message: Message, similarity: float) -> Member:
    return Member(
        message.id, message.text, message.intent, message.reason, message.captured_at, round(similarity, 4)
    )


def distinctive_words(texts: Sequence[str], labels: np.ndarray, n: int) -> dict[int, list[str]]:
    """Each label's `n` most distinctive words, by class-based TF-IDF: a label's messages are
    one document, so a word scores by how often its cluster uses it against how many clusters
    do. The noise is a document too: words every hand-off uses rank low everywhere."""
    classes = sorted(set(labels.tolist()))
    documents = [" ".join(texts[i] for i in np.flatnonzero(labels == c)) for c in classes]
    vectorizer = CountVectorizer(stop_words="english", preprocessor=_plain)
    try:
        counts = vectorizer.fit_transform(documents)
    except ValueError:  # nothing left but stop words
        return {c: [] for c in classes}
    weights = TfidfTransformer().fit_transform(counts).toarray()
    vocabulary = vectorizer.get_feature_names_out()
    return {
        c: [str(vocabulary[j]) for j in np.argsort(-row, kind="stable")[:n] if row[j] > 0]
        for c, row in zip(classes, weights, strict=True)
    }


def _plain(text: str) -> str:
    """CountVectorizer's lowercasing, and redaction's tokens left out."""
    return PLACEHOLDERS.sub(" ", text).lower()


def intent_directions(model: IntentModel) -> np.ndarray:
    """A unit vector per intent (model.labels' order) in the embedding space: the centroid of
    its training rows, which every version trained since the centroid score has
    (scores.Centroids); else its row of the head's weights, the direction its logit grows in."""
    network = model.torch_network
    centroids = dict(network.outputs.named_buffers()).get("centroids")
    directions = network.head.weight if centroids is None else centroids
    return normalize(directions.detach().float().cpu().numpy())


def name_cluster(
    store: Store,
    cluster: Cluster,
    label: str,
    reviewer: str,
    known: Collection[str],
    exclude: Collection[int] = (),
    new_intent: bool = False,
    oos_label: str = "oos",
) -> Named:
    """Records a review of each of the cluster's messages but `exclude`, labelled `label`: an
    intent of `known`, a new one (with `new_intent`), or `oos_label` (out of scope). Reviews
    are the store's ordinary ones, so the export takes them; a message someone reviewed since
    the cluster was found keeps its review."""
    label = label.strip()
    if not label:
        raise TransferDeskError("naming a cluster needs a label: an intent, a new one, or out of scope")
    if label != oos_label and label not in known and not new_intent:
        raise UnknownIntent(
            f"'{label}' is not an intent the model knows; confirm to add it as a new intent (the "
            "next retrain learns it; give it a route in the routing policy)"
        )
    left_out = set(exclude)
    if strangers := sorted(left_out - {m.id for m in cluster.members}):
        raise TransferDeskError(f"cluster {cluster.id} has no message {', '.join(map(str, strangers))}")
    chosen = [m for m in cluster.members if m.id not in left_out]
    if not chosen:
        raise TransferDeskError(f"every message of cluster {cluster.id} is excluded: nothing to record")
    open_ids = store.unreviewed([m.id for m in chosen])
    recorded, actions = [], set()
    for member in chosen:
        if member.id not in open_ids:
            continue
        if label == oos_label:
            store.review(member.id, reviewer, "out_of_scope")
            actions.add("out_of_scope")
        elif label == member.intent:
            store.review(member.id, reviewer, "confirm")
            actions.add("confirm")
        else:
            store.review(member.id, reviewer, "correct", label, new_intent=label not in known)
            actions.add("correct")
        recorded.append(member.id)
    return Named(
        cluster.id,
        label,
        "/".join(sorted(actions)) or "none",
        recorded,
        [m.id for m in chosen if m.id not in open_ids],
    )


class ClusterCache:
    """The latest clustering of a store's unreviewed hand-offs, for the review page: it is
    recomputed only when that set of messages has changed (one reviewed, one captured) or on
    request, and embedding, the cost, is done once a message (each review changes the set).
    One clustering at a time; call it off the event loop."""

    def __init__(self, store: Store, settings: ClusterSettings, model: Callable[[], IntentModel]) -> None:
        self.store, self.settings, self.model = store, settings, model
        self._lock = threading.Lock()
        self._key: tuple[int, ...] | None = None
        self._latest: Clustering | None = None
        self._vectors: dict[int, np.ndarray] = {}  # message id → its embedding

    def current(self, refresh: bool = False) -> Clustering:
        with self._lock:
            messages = self.store.handoffs(self.settings.reasons, self.settings.max_messages)
            key = tuple(m.id for m in messages)
            if refresh or self._latest is None or key != self._key:
                self._latest = self._cluster(messages)
                self._key = key
            return self._latest

    def _cluster(self, messages: list[Message]) -> Clustering:
        now = datetime.now(UTC)
        if not messages:
            return Clustering([], 0, 0, now)
        model = self.model()
        new = [m for m in messages if m.id not in self._vectors]
        if new:
            self._vectors.update(zip([m.id for m in new], model.embed([m.text for m in new]), strict=True))
        self._vectors = {m.id: self._vectors[m.id] for m in messages}  # the reviewed ones forgotten
        embeddings = np.stack([self._vectors[m.id] for m in messages])
        clusters = describe_clusters(model, messages, embeddings, self.settings, now)
        return Clustering(clusters, len(messages), len(messages) - sum(c.size for c in clusters), now)

    def find(self, cluster_id: str) -> Cluster:
        """A cluster as it was last listed, so that a reviewer names what they saw even after
        other reviews changed the hand-offs; never listed, as the hand-offs cluster now."""
        with self._lock:
            latest = self._latest
        if latest is not None and any(c.id == cluster_id for c in latest.clusters):
            return latest.find(cluster_id)
        return self.current().find(cluster_id)
