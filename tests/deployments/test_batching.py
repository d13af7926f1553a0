"""The Classifier's batching, in-process: the deployment class driven by plain asyncio."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from ray import serve

from deployments.app import Classifier
from tests.deployments.conftest import train_versions, write_policy

FORWARD_S = 0.2  # a forward pass slow enough for calls to arrive during it


@pytest.fixture(scope="module")
def version(tmp_path_factory: pytest.TempPathFactory, tiny_backbone: Path) -> Path:
    return train_versions(tmp_path_factory.mktemp("batching"), tiny_backbone)[0]


@pytest.fixture
def in_replica(monkeypatch: pytest.MonkeyPatch) -> None:
    """@serve.batch reads its replica's max_ongoing_requests (serve.yaml's) on its first call."""
    replica = SimpleNamespace(
        _deployment_config=SimpleNamespace(max_ongoing_requests=48),
        app_name="transferdesk",
        deployment="Classifier",
        replica_tag="test",
    )
    monkeypatch.setattr(serve.context, "_INTERNAL_REPLICA_CONTEXT", replica)


@pytest.mark.usefixtures("in_replica")
def test_calls_arriving_during_a_forward_pass_form_the_next_batch(version: Path) -> None:
    policy = write_policy(version.parent.parent.parent / "policy.yaml")
    classifier = Classifier.func_or_class(str(version), str(policy), threads=1)
    model = classifier.served.model
    passes: list[int] = []
    forward = model.logits_from_ids

    def timed_forward(ids: list[list[int]], batch_size: int) -> np.ndarray:
        passes.append(len(ids))
        time.sleep(FORWARD_S)
        return forward(ids, batch_size)

    model.logits_from_ids = timed_forward
    tok = model.tokenizer

    async def main() -> list[tuple]:
        async def call(i: int) -> tuple:
            await asyncio.sleep(i * FORWARD_S / 40)  # the first alone, ten more early in its pass
            return await classifier([tok(f"where is parcel {i}")["input_ids"]])

        return await asyncio.gather(*(call(i) for i in range(11)))

    answers = asyncio.run(main())
    assert [(version, len(predictions)) for version, predictions in answers] == [("toy/v1", 1)] * 11
    # The first call ran alone (no batch timer); the ten that arrived meanwhile ran together.
    assert passes == [1, 10]


@pytest.mark.usefixtures("in_replica")
def test_the_fused_ingress_batch_is_classified_whole_in_batches_of_max_batch_size(version: Path) -> None:
    policy = write_policy(version.parent.parent.parent / "policy.yaml")
    classifier = Classifier.func_or_class(str(version), str(policy), threads=1)
    asyncio.run(classifier.reconfigure({"max_batch_size": 8}))
    model = classifier.served.model
    batches: list[int] = []
    forward = model.logits_from_ids

    def counted_forward(ids: list[list[int]], batch_size: int) -> np.ndarray:
        batches.append(len(ids))
        return forward(ids, batch_size)

    model.logits_from_ids = counted_forward
    texts = ["where is my parcel", "cancel my order please", "refund", "hello there", "my card broke"]
    ids = model.tokenizer(texts)["input_ids"]
    calls = [ids[:5], ids[:3], ids + ids[:3]]  # 5 + 3 texts fill a batch of 8; 8 more, another

    answers = asyncio.run(classifier.answer(calls))

    assert batches == [8, 8]
    assert [(v, len(p)) for v, p in answers] == [("toy/v1", 5), ("toy/v1", 3), ("toy/v1", 8)]
    alone = [p.intent for _, ps in asyncio.run(classifier.answer([ids])) for p in ps]
    assert [p.intent for p in answers[2][1]] == alone + alone[:3]  # in order, as scored alone
