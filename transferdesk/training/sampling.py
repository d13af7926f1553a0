"""Which training rows go into each optimiser step."""

from __future__ import annotations

import torch

from transferdesk.config import StageConfig

# Same-intent rows placed together in a SupCon batch (4 intents × 4 rows in a batch of 16).
SUPCON_GROUP = 4


def shuffled_batches(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Random batches of similar length: shuffle, sort within windows of 8 batches, shuffle
    the batches. Padding to the longest utterance in a random batch roughly doubles the
    compute on short customer messages; this keeps most of the randomness without it."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * 8
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def intent_grouped_batches(
    targets: list[int], batch_size: int, generator: torch.Generator, per_intent: int = SUPCON_GROUP
) -> list[list[int]]:
    """Random batches made of groups of `per_intent` same-intent rows. SupCon learns only from
    anchors with a same-intent partner in the batch; random batches of 16 over 77 intents
    give one in six anchors a partner, these give nearly all of them one."""
    by_intent: dict[int, list[int]] = {}
    for i in torch.randperm(len(targets), generator=generator).tolist():
        by_intent.setdefault(targets[i], []).append(i)
    groups = [
        rows[j : j + per_intent] for rows in by_intent.values() for j in range(0, len(rows), per_intent)
    ]
    order = [i for g in torch.randperm(len(groups), generator=generator).tolist() for i in groups[g]]
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def epoch_batches(
    stage: StageConfig, targets: list[int], lengths: list[int], generator: torch.Generator
) -> list[list[int]]:
    """One epoch's batches, of the kind the stage's objective needs."""
    if stage.objective == "supcon":
        return intent_grouped_batches(targets, stage.batch_size, generator)
    return shuffled_batches(lengths, stage.batch_size, generator)
