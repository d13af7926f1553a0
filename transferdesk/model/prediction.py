"""What a classifier answers for one message. Kept free of torch: the Serve Ingress and
Router receive predictions and need not load a model runtime to read them."""

from __future__ import annotations

from dataclasses import dataclass, field


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
