"""Several requests in one message ("I was charged twice and I also need a new card"), found by
the single-intent model alone, from single-intent labels: every cut of the message in two at a
word boundary is scored, both parts, in one batch. Where the two parts of the best cut go to
different intents with at least the model's `multi_intent_threshold` of confidence (the
geometric mean of the two parts'), the message holds two requests, the left part's first.
Training chooses the threshold on single validation messages (`choose_threshold`): the lowest
that splits at most calibration.multi_intent_single_rate of them.

No connective is needed or assumed ("and", "also", a full stop or none at all): the model
itself says where one request ends. The cost is two forward passes per cut, (words − 3) cuts
for parts of two words or more, so it runs only where asked (serving's `multi_intent`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from transferdesk.errors import TransferDeskError
from transferdesk.model.explain import spans

if TYPE_CHECKING:
    from transferdesk.model.modeling import IntentModel

MIN_WORDS = 2  # words in each part of a cut at least: a lone word is rarely a request


@dataclass(frozen=True)
class Cut:
    """The best cut of a message in two: where the second part begins (a character offset),
    and each part's top intent with its confidence; `score` is the geometric mean of the two
    (how likely both parts are what the model says, on the scale of one confidence; the lower
    of the two chose a cut in the wrong place where one part was a little surer), 0 where the
    two parts go to the same intent."""

    at: int
    first: tuple[str, float]
    second: tuple[str, float]

    @property
    def score(self) -> float:
        return 0.0 if self.first[0] == self.second[0] else float(np.sqrt(self.first[1] * self.second[1]))


def cuts(text: str) -> list[tuple[str, str, int]]:
    """Each cut of the message at a word boundary leaving MIN_WORDS words on either side: the
    two parts and where the second begins."""
    words = spans(text)
    return [
        (text[: words[i - 1][1]], text[words[i][0] :], words[i][0])
        for i in range(MIN_WORDS, len(words) - MIN_WORDS + 1)
    ]


def cut_parts(texts: Sequence[str]) -> tuple[list[list[int]], list[str]]:
    """Where each message's cuts begin its second part, and every part of every cut in order
    (first, second, first, second …): what is scored for `chosen_cuts`."""
    every = [cuts(text) for text in texts]
    return [[at for _, _, at in found] for found in every], [
        part for found in every for first, second, _ in found for part in (first, second)
    ]


def chosen_cuts(starts: list[list[int]], tops: Sequence[tuple[str, float]]) -> list[Cut | None]:
    """Each message's best cut (the highest score; None for a message too short to cut) from
    the top intent and confidence of each part `cut_parts` listed."""
    out: list[Cut | None] = []
    row = 0
    for found in starts:
        best: Cut | None = None
        for at in found:
            cut = Cut(at, tuple(tops[row]), tuple(tops[row + 1]))
            row += 2
            if best is None or cut.score > best.score:
                best = cut
        out.append(best)
    return out


def best_cuts(model: IntentModel, texts: Sequence[str], batch_size: int = 64) -> list[Cut | None]:
    """Each message's best cut, from one batched pass over every part of every cut."""
    starts, parts = cut_parts(texts)
    probs = model.predict_proba(parts, batch_size) if parts else np.zeros((0, len(model.labels)))
    return chosen_cuts(
        starts, [(model.labels[i], float(c)) for i, c in zip(probs.argmax(1), probs.max(1), strict=True)]
    )


def requests(cut: Cut | None, threshold: float | None) -> list[tuple[str, float]] | None:
    """The message's two requests, in its order, when its best cut clears `threshold`; None:
    one request (or no threshold: the model was not calibrated for several)."""
    if cut is None or threshold is None or cut.score < threshold:
        return None
    return [cut.first, cut.second]


def choose_threshold(singles: Sequence[Cut | None], max_single_rate: float) -> float:
    """The lowest threshold that gives at most `max_single_rate` of these single messages (their
    best cuts) a second request."""
    scores = np.sort([cut.score if cut is not None else 0.0 for cut in singles])[::-1]
    allowed = int(np.floor(max_single_rate * len(scores)))
    # Strictly above the (allowed + 1)-th highest score: that message and every lower one stay single.
    return float(np.nextafter(scores[allowed], 1.0)) if allowed < len(scores) else 0.0


def find_requests(
    model: IntentModel, texts: Sequence[str], batch_size: int = 64
) -> list[list[tuple[str, float]] | None]:
    """Each message's two requests (see `requests`), None where it holds one."""
    if model.multi_intent_threshold is None:
        raise TransferDeskError(
            "this version was not calibrated for several requests in a message: train it with "
            "--calibration.multi_intent_rows 500"
        )
    return [requests(cut, model.multi_intent_threshold) for cut in best_cuts(model, texts, batch_size)]
