"""What a training method is: the interface each implements, their registry by name, and the
run they work on.

A run's recipe is a chain of methods (`RunConfig.recipe`, or the chain its data implies;
chain.py runs it), each a `Recipe` registered by name in `recipes/`. Every method has two
parts:

- `prepare`: the work the fit builds on, cached in the registry (a source-stage checkpoint,
  an encoder pre-trained on a pool, teachers' labels of a pool), left in `Run.prepared`;
- `fit`: the training that returns the model (the last method of a chain that fits one).

`train` prepares and fits in one process. A Ray Tune search prepares once per candidate
before any trial (as Ray tasks, with the run's own settings) and each trial fits with its
sampled settings and a reporting callback: the same code either way. The shared ending
(calibration, publishing) is train.py's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from transferdesk.config import SOURCE_TASK, RunConfig
from transferdesk.data import Splits, stratified_split
from transferdesk.model.modeling import IntentModel
from transferdesk.registry import Registry
from transferdesk.training.trainer import Callback, FitResult, TaskData, Trainer

log = logging.getLogger(__name__)

# Share of the source data held out to early-stop the source stage (and the joint source task).
SOURCE_VALID_FRACTION = 0.1


@dataclass
class Prepared:
    """What the preparing methods leave for the fit: plain data (paths, cache keys, seconds), so
    that a search can prepare once and hand it to every trial."""

    backbone: str  # what the fit starts from: model.backbone, or a prepared encoder
    source_checkpoint: str | None = None  # the source stage's, in the registry
    adapted: str | None = None  # the encoder pre-trained on the pool, in the registry
    teachers: list[str] = field(default_factory=list)  # cache keys of the teachers' pool labels
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class Run:
    """One run as its methods see it: the settings the model is fitted with, the data, where it
    trains and what was prepared."""

    cfg: RunConfig
    splits: Splits
    device: torch.device
    prepared: Prepared
    pretrained: bool = True  # False: random weights of the backbone's shape (a control)
    callbacks: list[Callback] = field(default_factory=list)
    log_dir: Path | None = None

    @property
    def registry(self) -> Registry:
        return Registry(self.cfg.output)

    @property
    def trainer(self) -> Trainer:
        return Trainer.of(self.cfg, self.device)

    def tasks(self) -> TaskData | None:
        """The heads the fit trains besides the intent's: data.tasks, and the source task when
        it trains jointly (`joint` in the chain). None: the intent's alone."""
        labels = self.splits.task_labels()
        weights = {task: settings.weight for task, settings in self.cfg.data.tasks.items()}
        own = dict(self.splits.own)
        if self.splits.source is not None and "joint" in self.cfg.methods():
            own[SOURCE_TASK] = stratified_split(
                self.splits.source, SOURCE_VALID_FRACTION, self.cfg.runtime.seed
            )
            labels[SOURCE_TASK] = self.splits.source.intents
            weights[SOURCE_TASK] = self.cfg.joint.weight
        return TaskData(labels, weights, own) if labels else None


@dataclass
class Fitted:
    """What a fit returns: the model at its best validation epoch, how the fit went, and what
    the method adds to the version's metrics.json."""

    model: IntentModel
    fit: FitResult
    timings: dict[str, float] = field(default_factory=dict)
    record: dict = field(default_factory=dict)


class Recipe:
    """A training method. Subclasses set `name`, register with `@register`, and override
    `check`, `prepare` and/or `fit`; each does nothing unless overridden."""

    name: ClassVar[str]

    def check(self, run: Run) -> None:
        """Fail fast, before any method trains, on settings this method cannot work with."""

    def prepare(self, run: Run) -> None:
        """Work the fit builds on, cached in the registry; updates `run.prepared`."""

    def fit(self, run: Run) -> Fitted | None:
        """The model; None: this method only prepares."""
        return None


RECIPES: dict[str, type[Recipe]] = {}


def register(cls: type[Recipe]) -> type[Recipe]:
    """Make a method available by its name in `RunConfig.recipe`."""
    RECIPES[cls.name] = cls
    return cls


def timed(timings: dict[str, float], key: str, start: float) -> None:
    """Record the seconds since `start` under `key`."""
    timings[key] = time.perf_counter() - start
