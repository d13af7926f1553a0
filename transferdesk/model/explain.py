"""Why a model decided as it did, in words: occlusion, a baseline of ERASER (DeYoung et al.,
2020). Each word of a message is left out in turn and the message scored again, every variant
in one batch; a word's weight is how much the decided intent's confidence falls without it
(negative: the word held it down). Whatever predicts the variants (torch, ONNX Runtime, the
Serve application's own path) explains alike, so every served model explains itself; it costs
one forward pass per word, batched.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from transferdesk.errors import TransferDeskError

if TYPE_CHECKING:
    from transferdesk.model.modeling import IntentModel

# Words as a reader sees them: runs without spaces, punctuation kept with its word.
WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class Word:
    """One word of the message: where it is (character offsets, to highlight it) and how much
    the explained intent's confidence falls without it."""

    text: str
    start: int
    end: int
    weight: float


@dataclass(frozen=True)
class Explanation:
    text: str
    intent: str  # the intent explained: the model's top one, unless another was asked for
    confidence: float  # its confidence with every word in
    words: list[Word]

    def top(self, n: int) -> list[Word]:
        """The n words that raised the confidence most, the strongest first."""
        return sorted(self.words, key=lambda w: -w.weight)[:n]


def spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each word."""
    return [m.span() for m in WORD.finditer(text)]


def without(text: str, words: Sequence[tuple[int, int]], dropped: set[int]) -> str:
    """The message without the words at those positions (the rest joined by single spaces)."""
    return " ".join(text[start:end] for i, (start, end) in enumerate(words) if i not in dropped)


def variants(text: str) -> list[str]:
    """The message, then the message without each of its words in turn: what `weigh` reads."""
    words = spans(text)
    return [text, *(without(text, words, {i}) for i in range(len(words)))]


def weigh(text: str, intent: str, confidences: Sequence[float]) -> Explanation:
    """The explanation from the explained intent's confidence on each of `variants(text)`."""
    words = spans(text)
    if len(confidences) != len(words) + 1:
        raise ValueError(f"{len(confidences)} confidences for {len(words) + 1} variants of {text!r}")
    base = float(confidences[0])
    return Explanation(
        text,
        intent,
        base,
        [Word(text[s:e], s, e, base - float(c)) for (s, e), c in zip(words, confidences[1:], strict=True)],
    )


def explain(
    model: IntentModel,
    texts: Sequence[str],
    intents: Sequence[str | None] | None = None,
    batch_size: int = 64,
) -> list[Explanation]:
    """Each message's explanation of its top intent (or of `intents[i]` where given), from one
    batched pass over all their variants."""
    index = {label: i for i, label in enumerate(model.labels)}
    every = [variants(text) for text in texts]
    probs = model.predict_proba([v for group in every for v in group], batch_size)
    out, row = [], 0
    for i, (text, group) in enumerate(zip(texts, every, strict=True)):
        block = probs[row : row + len(group)]
        row += len(group)
        asked = intents[i] if intents is not None else None
        if asked is not None and asked not in index:
            raise TransferDeskError(f"{asked!r} is not an intent of this model")
        column = index[asked] if asked is not None else int(block[0].argmax())
        out.append(weigh(text, model.labels[column], block[:, column]))
    return out
