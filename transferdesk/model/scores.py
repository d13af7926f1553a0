"""Out-of-scope scores, each a named component: how in-scope a message looks (higher: more),
from a forward pass's output. The model object applies the one its calibration names
(`calibration.score`); its threshold is chosen on that score (confidence.py).

A score reads the intent's logits (with the temperature), and perhaps a *network output*: more
columns the network appends to its output, computed in the forward pass from the pooled
sentence vector and a tensor fitted on labelled training rows (the intents' centroids). Being
in the forward pass, an output is in the ONNX graph too, and so the torch path, the ONNX
runtimes and Serve all read a score from the same place.

Adding a score: a subclass of `OutOfScopeScore` decorated with `@register_score` (and, if it
reads something the network does not give yet, a `NetworkOutput` with `@register_output`).
Defined in a module of its own, it registers when that module is imported: import it at the
end of this one, so every process (training, Serve, the export check) knows it. Kept free of
torch at import (the configuration imports `Score`): outputs import it where they run.

`OutputLayout` says which columns of the output are whose: the network writes its output by
it (network.IntentClassifier.forward), the model object reads it back by it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal, TypeVar

import numpy as np
from pydantic import PlainValidator
from scipy.special import logsumexp

from transferdesk.errors import TransferDeskError
from transferdesk.model.confidence import scaled_softmax

if TYPE_CHECKING:
    import torch

    from transferdesk.config import CalibrationConfig
    from transferdesk.model.modeling import IntentModel


class NetworkOutput:
    """Columns the network appends to its output after the heads' logits: computed by `forward`
    from the pooled sentence vector (before dropout) and a tensor `fit` on labelled training
    rows. The tensor is a buffer of the network (never trained, moved and exported with it) and
    is saved with the head under `name` (settings: `"<name>": true`)."""

    name: ClassVar[str]
    what: ClassVar[str]  # what the fitted tensor is, for messages

    def width(self, intents: int) -> int:
        """Its number of columns, for a model of `intents` intents."""
        raise NotImplementedError

    def fit(self, model: IntentModel, texts: list[str], labels: list[str], batch_size: int) -> torch.Tensor:
        """The tensor, from labelled training rows (out-of-scope ones among them)."""
        raise NotImplementedError

    def forward(self, state: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """Rows × width columns from the fitted tensor and the rows' pooled sentence vectors."""
        raise NotImplementedError


class OutOfScopeScore:
    """How in-scope each row looks, higher = more, from the intent's logits (rows × intents),
    the model's temperature and the network outputs named in `outputs` (rows × their columns).
    What it needs fitted on training rows is fitted as those outputs are."""

    name: ClassVar[str]
    outputs: ClassVar[tuple[str, ...]] = ()

    def score(self, logits: np.ndarray, temperature: float, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def __call__(
        self, logits: np.ndarray, temperature: float, outputs: Mapping[str, np.ndarray] | None = None
    ) -> np.ndarray:
        outputs = outputs or {}
        if missing := [name for name in self.outputs if name not in outputs]:
            needs_none = ", ".join(name for name, score in SCORES.items() if not score.outputs)
            raise TransferDeskError(
                f"calibration.score {self.name} needs {OUTPUTS[missing[0]].what} (network output "
                f"{missing[0]}), which this model was saved without; retrain it, or use a score that "
                f"needs none: {needs_none}"
            )
        return self.score(logits, temperature, outputs)


# What the registries hold, by name, in registration order (which is the output's column order).
SCORES: dict[str, OutOfScopeScore] = {}
OUTPUTS: dict[str, NetworkOutput] = {}
S = TypeVar("S", bound=type[OutOfScopeScore])
N = TypeVar("N", bound=type[NetworkOutput])


def register_output(cls: N) -> N:
    """Class decorator: a network output, known by its `name` from now on."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", cls.name) or cls.name in ("weight", "bias"):
        raise TransferDeskError(f"network output {cls.name!r}: name it in lower case, not weight or bias")
    OUTPUTS[cls.name] = cls()
    return cls


def register_score(cls: S) -> S:
    """Class decorator: an out-of-scope score, a `calibration.score` from now on."""
    if unknown := [name for name in cls.outputs if name not in OUTPUTS]:
        raise TransferDeskError(f"score {cls.name} reads network outputs no one registered: {unknown}")
    SCORES[cls.name] = cls()
    return cls


def get_score(name: str) -> OutOfScopeScore:
    if name not in SCORES:
        raise TransferDeskError(_unknown(name))
    return SCORES[name]


def _unknown(name: object) -> str:
    return f"unknown out-of-scope score {name!r}; registered: {', '.join(SCORES)}"


def registered_score(name: object) -> str:
    """A configuration's score name, checked against the registry when it is read (so a score
    registered after the configuration module was imported is accepted too)."""
    if not isinstance(name, str) or name not in SCORES:
        raise ValueError(_unknown(name))
    return name


def needed_outputs(scores: Iterable[str] | None = None) -> tuple[str, ...]:
    """The network outputs `scores` read (default: every registered score), in column order."""
    wanted = {name for score in (SCORES if scores is None else scores) for name in get_score(score).outputs}
    return tuple(name for name in OUTPUTS if name in wanted)


def network_outputs(names: Iterable[str]) -> tuple[str, ...]:
    """`names` in column order, each refused unless registered."""
    names = set(names)
    if unknown := sorted(names - OUTPUTS.keys()):
        raise TransferDeskError(
            f"this model's network has the output(s) {', '.join(unknown)}, which no loaded module "
            f"registered (registered: {', '.join(OUTPUTS) or 'none'}); import the module that "
            "defines them first"
        )
    return tuple(name for name in OUTPUTS if name in names)


T = TypeVar("T")


@dataclass(frozen=True)
class OutputLayout:
    """The columns of a forward pass's output (and so of the ONNX graph's one output), side by
    side in this order: the intent's logits, each other task's (`tasks`, in head order), then
    each network output's (`outputs`, in registration order)."""

    intents: int
    tasks: tuple[tuple[str, int], ...] = ()
    outputs: tuple[tuple[str, int], ...] = ()

    @classmethod
    def of(
        cls, intents: int, tasks: Mapping[str, int] | None = None, outputs: Iterable[str] = ()
    ) -> OutputLayout:
        """From the heads' sizes and the names of the network's outputs."""
        named = tuple((name, OUTPUTS[name].width(intents)) for name in network_outputs(outputs))
        return cls(intents, tuple((tasks or {}).items()), named)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.outputs)

    @property
    def width(self) -> int:
        return self.intents + sum(n for _, n in self.tasks) + sum(n for _, n in self.outputs)

    def join(self, intent: T, tasks: Mapping[str, T], outputs: Mapping[str, T]) -> list[T]:
        """The parts of an output in column order (the network concatenates them)."""
        return [
            intent,
            *(tasks[name] for name, _ in self.tasks),
            *(outputs[name] for name, _ in self.outputs),
        ]

    def intent(self, columns: np.ndarray) -> np.ndarray:
        """The intent's logits of an output."""
        return columns[:, : self.intents]

    def split(self, columns: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
        """An output read back: the intent's logits, each task's logits, each network output's."""
        parts: list[np.ndarray] = []
        start = 0
        for n in (self.intents, *(n for _, n in self.tasks), *(n for _, n in self.outputs)):
            parts.append(columns[:, start : start + n])
            start += n
        rest = iter(parts[1:])
        return parts[0], {t: next(rest) for t, _ in self.tasks}, {o: next(rest) for o, _ in self.outputs}


# -- the built-in network output and scores ---------------------------------------------------


@register_output
class Centroids(NetworkOutput):
    """The cosine similarity of the message's sentence vector to each intent's centroid: the
    direction of the mean unit sentence vector of its training rows (IntentModel.class_centroids;
    rows of other labels, out-of-scope ones, left out)."""

    name = "centroids"
    what = "the intents' centroids"

    def width(self, intents: int) -> int:
        return intents

    def fit(self, model: IntentModel, texts: list[str], labels: list[str], batch_size: int) -> torch.Tensor:
        return model.class_centroids(texts, labels, batch_size=batch_size)[0]

    def forward(self, state: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        from torch.nn.functional import normalize

        return normalize(embedded, dim=-1) @ state.to(embedded.dtype).T


@register_score
class Softmax(OutOfScopeScore):
    """The calibrated top probability."""

    name = "softmax"

    def score(self, logits: np.ndarray, temperature: float, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        return scaled_softmax(logits, temperature).max(axis=1)


@register_score
class Energy(OutOfScopeScore):
    """The temperature-free log-sum-exp of the logits (Liu et al. 2020), which keeps the
    logits' scale that softmax normalises away."""

    name = "energy"

    def score(self, logits: np.ndarray, temperature: float, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        return logsumexp(logits.astype(np.float64), axis=1)


@register_score
class Centroid(OutOfScopeScore):
    """The cosine similarity to the nearest intent's centroid (the encoder's geometry: a message
    unlike every intent's training rows is far from all of them, however the head ranks it)."""

    name = "centroid"
    outputs = ("centroids",)

    def score(self, logits: np.ndarray, temperature: float, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        return outputs["centroids"].astype(np.float64).max(axis=1)


# A configuration's calibration.score: a registered score's name. Annotated as the names known
# at import (help and schema list them), checked against the registry as it is then.
_NAMES = Literal[tuple(SCORES)]  # type: ignore[valid-type]
Score = Annotated[_NAMES, PlainValidator(registered_score, json_schema_input_type=_NAMES)]


# What a model in training scores out-of-scope messages by in place of a score that reads a
# network output, which training fits last (train.calibrate).
TRAINING_SCORE = "energy"


def training_calibration(calibration: CalibrationConfig) -> CalibrationConfig:
    """What a model in training scores out-of-scope messages by (validation's AUROC chooses
    its epoch with it): the run's score, or TRAINING_SCORE in place of one that reads a network
    output (the centroid score). Measured so: the centroid figures of benchmarks/out_of_scope.py
    are of models whose epochs energy chose."""
    if not get_score(calibration.score).outputs:
        return calibration
    return calibration.model_copy(update={"score": TRAINING_SCORE})
