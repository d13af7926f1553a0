"""Settings of `transferdesk review` (the review page, its clusters of hand-offs) and of
`transferdesk review export`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from transferdesk.config import Section


class ClusterSettings(Section):
    """How `transferdesk review` groups the unreviewed hand-offs into candidate new intents:
    HDBSCAN over the served model's sentence embeddings (transferdesk/review/clusters.py)."""

    reasons: list[str] = Field(
        ["out_of_scope", "low_confidence", "queue_threshold"],
        min_length=1,
        description="The capture reasons of the messages clustered: the model's out-of-scope verdict "
        "and the hand-offs for too little confidence (overall, or for the route's queue).",
    )
    max_messages: int = Field(
        5000,
        ge=2,
        le=100_000,
        description="Newest unreviewed hand-offs clustered at most: each is embedded by the model.",
    )
    min_cluster_size: int = Field(
        5, ge=2, description="Fewest messages a cluster holds; smaller groups are left as noise."
    )
    # 2, not HDBSCAN's default (min_cluster_size): a new intent's hand-offs are few and spread,
    # and asking each core message for 5 close neighbours left half of them as noise (BANKING77,
    # 10 held-out intents: 5 of them found at None, 8 at 2; docs/review-loop.md).
    min_samples: int | None = Field(
        2,
        ge=1,
        description="Neighbours a message needs to be a cluster's core (HDBSCAN's min_samples): the "
        "larger, the more messages are left as noise. Unset: min_cluster_size.",
    )
    selection: Literal["eom", "leaf"] = Field(
        "eom",
        description="HDBSCAN's cluster_selection_method: eom favours a few large clusters, leaf many "
        "small, homogeneous ones.",
    )
    dimensions: int | None = Field(
        32,
        ge=2,
        description="PCA components the unit sentence vectors are reduced to before clustering "
        "(density is hard to estimate in hundreds of dimensions); null: not reduced.",
    )
    growth_hours: float = Field(
        24.0,
        gt=0,
        description="Growth compares a cluster's messages of the last this many hours with the "
        "same period before.",
    )
    representatives: int = Field(
        5, ge=1, description="Messages shown per cluster, the closest to its centre first."
    )
    words: int = Field(8, ge=1, description="Distinctive words shown per cluster (class-based TF-IDF).")
    nearest: int = Field(3, ge=1, description="Nearest existing intents shown per cluster.")


class ReviewConfig(Section):
    """Settings of `transferdesk review` (the review page) and `transferdesk review export`."""

    store: str = Field(
        "sqlite:///capture.db",
        description="The capture store's SQLAlchemy URL, as serving's args.capture.store "
        "($TRANSFERDESK_CAPTURE_STORE, where set, takes precedence).",
    )
    model: str | None = Field(
        None,
        description="The served model (registry/<name>@production): its intents are the ones a reviewer "
        "picks from, and hand-offs are clustered in its embedding space. Unset: the intents the "
        "store's messages were given, and no clustering.",
    )
    host: str = Field("127.0.0.1", description="Interface the review page listens on.")
    port: int = Field(8100, ge=1, le=65535, description="Port of the review page.")
    queue_size: int = Field(25, ge=1, le=500, description="Messages the page lists at once.")
    oos_label: str = Field("oos", description="Label the export gives messages marked out-of-scope.")
    max_body_bytes: int = Field(
        65536, ge=1024, le=16 * 2**20, description="Largest request body the review page reads; larger: 413."
    )
    clusters: ClusterSettings = ClusterSettings()
