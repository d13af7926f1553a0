"""What a classifier answers: for one message (`Prediction`), and from one forward pass over
rows (`Heads`). Kept free of torch: the Serve Ingress and Router receive predictions and need
not load a model runtime to read them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np


class Heads(NamedTuple):
    """What one forward pass says of each row: the intent's calibrated probabilities, each other
    task's, and how in-scope the row looks (the model's out-of-scope score; higher: more)."""

    intent: np.ndarray
    tasks: dict[str, np.ndarray]
    score: np.ndarray


@dataclass(frozen=True)
class Prediction:
    """One message's answer. `intent` is the best in-scope intent even when `out_of_scope`
    is set (a human agent still sees the model's guess); `label` is what to score or act on.
    `tasks`: each other head's best label and its confidence (a model with more tasks)."""

    intent: str
    confidence: float
    out_of_scope: bool
    label: str  # intent, or the model's out-of-scope label when out_of_scope
    ranked: tuple[tuple[str, float], ...]  # (intent, confidence), best first; ranked[0] is intent
    tasks: dict[str, tuple[str, float]] = field(default_factory=dict)  # task → (label, confidence)

    @property
    def alternatives(self) -> tuple[tuple[str, float], ...]:
        return self.ranked[1:]


def rounded(value: float, digits: int | None) -> float:
    return value if digits is None else round(value, digits)
