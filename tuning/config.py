"""The tuning configuration: a run configuration (the base of every trial), source-model
candidates, a search space and search settings. One YAML file holds all of it, the run
settings under `run:` (see configs/tune-sample.yaml).

Every searchable setting is one row of SEARCHABLE: its name in `space:`, the RunConfig field
it sets, and how it is sampled. The SearchSpace model, its validation, Tune's domains, the
baseline points and the trial table all follow from that row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, create_model, field_validator, model_validator
from pydantic.fields import FieldInfo

from transferdesk.config import RunConfig, Section, load_config


@dataclass(frozen=True)
class Searchable:
    target: str  # dotted RunConfig field the sampled value sets
    scale: Literal["log", "linear", "int", "choice"]  # ranges [low, high] sampled so, or choices
    default: tuple | list

    def field(self) -> FieldInfo:
        """The RunConfig field behind this setting, with its type and bounds."""
        section, name = self.target.split(".")
        return RunConfig.model_fields[section].annotation.model_fields[name]


SEARCHABLE: dict[str, Searchable] = {
    "encoder_lr": Searchable("training.encoder_lr", "log", (2e-5, 1e-4)),
    "head_lr": Searchable("training.head_lr", "log", (1e-3, 5e-3)),
    "batch_size": Searchable("training.batch_size", "choice", [16]),
    "epochs": Searchable("training.epochs", "int", (6, 10)),  # ASHA's maximum is the high end
    "warmup_ratio": Searchable("training.warmup_ratio", "linear", (0.0, 0.2)),
    "weight_decay": Searchable("training.weight_decay", "linear", (0.0, 0.05)),
    "dropout": Searchable("model.dropout", "linear", (0.0, 0.2)),
    "pooling": Searchable("model.pooling", "choice", ["mean"]),
    "max_length": Searchable("model.max_length", "choice", [64]),
    "freeze_layers": Searchable("training.freeze_layers", "int", (0, 0)),
    # Outlier exposure: used where the training data has out-of-scope rows.
    "outlier_weight": Searchable("training.outlier_weight", "linear", (0.0, 0.0)),
    # Self-training from run.data.unlabelled (ignored without a pool).
    "semi_supervised": Searchable("semi_supervised.enabled", "choice", [True]),
    "pseudo_targets": Searchable("semi_supervised.targets", "choice", ["soft"]),
    "pseudo_threshold": Searchable("semi_supervised.threshold", "linear", (0.5, 0.5)),
    "teachers": Searchable("semi_supervised.teachers", "int", (1, 1)),
    # null: the candidate's own encoder; a larger one (a model directory or hub id) teaches better.
    "teacher_backbone": Searchable("semi_supervised.teacher_backbone", "choice", [None]),
    "neighbours": Searchable("semi_supervised.neighbours", "choice", [0]),
    "rounds": Searchable("semi_supervised.rounds", "int", (1, 1)),
    "student_epochs": Searchable("semi_supervised.student_epochs", "int", (3, 3)),
}
# Searched choices the baseline trials cover one by one (each candidate with and without the
# pool), so the table shows what each bought.
COMPARED = ("semi_supervised",)
_DESCRIBE = {
    "log": "Log-uniform range",
    "linear": "Uniform range",
    "int": "Integer range",
    "choice": "Choices",
}


class Candidate(Section):
    """One source-model choice: a backbone as it is, or fine-tuned first on a source task."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$", description="Short name for tables.")
    backbone: str = Field("all-MiniLM-L6-v2", description="Backbone name, model directory or hub id.")
    source: str | None = Field(None, description="Source-task data; unset: the backbone as it is.")
    objective: Literal["cross_entropy", "supcon"] = Field(
        "cross_entropy", description="Source-stage loss (supcon keeps sentence geometry)."
    )
    source_epochs: int | None = Field(None, ge=1, description="Source-stage epochs (default: the run's).")
    transfer: Literal["sequential", "joint"] = Field(
        "sequential",
        description="With a source: a source stage before the trials (sequential), or the source "
        "task trained in every trial beside the target, a head of its own (joint).",
    )
    pretrained: bool = Field(
        True, description="false: random weights of the backbone's shape, a 'no transfer' control."
    )

    @model_validator(mode="after")
    def _control_has_no_source(self) -> Candidate:
        if not self.pretrained and self.source:
            raise ValueError("a 'no transfer' candidate (pretrained: false) cannot have a source stage")
        if self.transfer == "joint" and not self.source:
            raise ValueError(
                f"candidate {self.name}: transfer: joint needs a `source` to train beside the target"
            )
        return self

    @property
    def source_stage(self) -> bool:
        """Whether its trials start from a source stage's checkpoint."""
        return self.source is not None and self.transfer == "sequential"

    @property
    def joint_source(self) -> str | None:
        """The source its trials train jointly with the target, if any."""
        return self.source if self.transfer == "joint" else None


def _space_field(name: str, knob: Searchable) -> tuple[Any, FieldInfo]:
    target = knob.field()
    # The target's type and bounds (pooling: mean or cls; epochs: at least 1; rates: above 0).
    value = Annotated[target.annotation, *target.metadata] if target.metadata else target.annotation
    description = f"{_DESCRIBE[knob.scale]} of {knob.target}."
    if knob.scale == "choice":
        return list[value], Field(list(knob.default), min_length=1, description=description)
    return tuple[value, value], Field(tuple(knob.default), description=f"{description} A number fixes it.")


class _SpaceBase(Section):
    """Ranges are [low, high] (a single number fixes the value); lists are choices."""

    @field_validator(
        *(n for n, k in SEARCHABLE.items() if k.scale != "choice"), mode="before", check_fields=False
    )
    @classmethod
    def _pair(cls, value: Any) -> Any:
        """A scalar means a fixed value: [x, x]."""
        return [value, value] if isinstance(value, int | float) else value

    @model_validator(mode="after")
    def _ordered(self) -> _SpaceBase:
        for name, knob in SEARCHABLE.items():
            if knob.scale != "choice" and (bounds := getattr(self, name))[0] > bounds[1]:
                raise ValueError(f"space.{name}: low {bounds[0]} is above high {bounds[1]}")
        return self


SearchSpace = create_model(
    "SearchSpace", __base__=_SpaceBase, **{n: _space_field(n, k) for n, k in SEARCHABLE.items()}
)


class SearchSettings(Section):
    algorithm: Literal["optuna", "random"] = Field("optuna", description="Search algorithm.")
    num_samples: int = Field(8, ge=1, description="Trials to run.")
    max_concurrent: int | None = Field(None, ge=1, description="Trials at once (unset: as resources allow).")
    metric: Literal["auto", "accuracy", "macro_f1", "accuracy_auroc"] = Field(
        "auto",
        description="Validation metric to maximise (accuracy_auroc: in-scope accuracy averaged with the "
        "out-of-scope AUROC; needs out-of-scope rows in validation). auto: run.training.monitor's "
        "(whose auto is accuracy_auroc where validation has out-of-scope rows, else accuracy).",
    )
    grace_period: int = Field(2, ge=1, description="ASHA: epochs every trial gets before it can be stopped.")
    reduction_factor: float = Field(2, gt=1, description="ASHA: keep 1/this of trials at each rung.")
    cpus_per_trial: float = Field(1, gt=0, description="CPUs reserved per trial (and per source stage).")
    gpus_per_trial: float = Field(0, ge=0, description="GPUs per trial; fractions share a GPU.")
    storage_path: str = Field(
        "tune_results", description="Where Ray keeps trial state: a local path, shared filesystem or s3://."
    )
    max_failures: int = Field(2, ge=0, description="Retries of a crashed trial.")
    seed: int | None = Field(13, description="Seed of the search algorithm.")
    baseline: bool = Field(
        True,
        description="First trials: the run's own training settings on each candidate, so the "
        "table shows what the source model and what the search added. ASHA never cuts them.",
    )
    time_budget_s: float | None = Field(
        None,
        gt=0,
        description="Stop the search, running trials too, after this many seconds; export the best so far.",
    )


class TuneSpec(Section):
    """What to search, around one run configuration."""

    run: RunConfig = Field(RunConfig(), description="The run every trial starts from (name: the search's).")
    candidates: list[Candidate] = Field(
        default_factory=lambda: [Candidate(name="minilm")],
        min_length=1,
        description="Source-model choices.",
    )
    space: SearchSpace = SearchSpace()
    search: SearchSettings = SearchSettings()

    @model_validator(mode="before")
    @classmethod
    def _run_settings_under_run(cls, data: Any) -> Any:
        if isinstance(data, dict) and (flat := sorted(set(data) & set(RunConfig.model_fields))):
            raise ValueError(
                f"{', '.join(flat)}: run settings go under `run:` (since the tuning spec holds a run "
                "configuration rather than extending it); indent them below a `run:` key"
            )
        return data

    @model_validator(mode="after")
    def _unique_candidates(self) -> TuneSpec:
        names = [c.name for c in self.candidates]
        if len(set(names)) != len(names):
            raise ValueError(f"candidate names must be unique, got {names}")
        if self.search.baseline and self.search.num_samples < len(names):
            raise ValueError(
                f"search.num_samples={self.search.num_samples} leaves no room for the {len(names)} "
                "baseline trials (one per candidate): raise it, or set search.baseline: false"
            )
        return self

    def base_run(self) -> RunConfig:
        """The run settings every trial and source stage starts from: no progress bars (Tune
        shows its own) and one torch thread per CPU reserved for it."""
        threads = max(1, int(self.search.cpus_per_trial))
        runtime = self.run.runtime.model_copy(update={"progress": False, "num_threads": threads})
        return self.run.model_copy(update={"runtime": runtime})

    def uses_pool(self) -> bool:
        """Do trials (some of them) learn from an unlabelled pool."""
        return self.run.data.unlabelled is not None and True in self.space.semi_supervised

    def candidate(self, name: str) -> Candidate:
        return next(c for c in self.candidates if c.name == name)


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> TuneSpec:
    return load_config(path, overrides, TuneSpec)
