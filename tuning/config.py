"""The tuning configuration: a RunConfig plus source-model candidates, a search space and
search settings. One YAML file holds all of it (see configs/tune-sample.yaml)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from transferdesk.config import RunConfig, Section, load_config


class Candidate(Section):
    """One source-model choice: a backbone as it is, or fine-tuned first on a source task."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$", description="Short name for tables.")
    backbone: str = Field("all-MiniLM-L6-v2", description="Backbone name, model directory or hub id.")
    source: str | None = Field(None, description="Source-task data; unset: the backbone as it is.")
    objective: Literal["cross_entropy", "supcon"] = Field(
        "cross_entropy", description="Source-stage loss (supcon keeps sentence geometry)."
    )
    source_epochs: int | None = Field(None, ge=1, description="Source-stage epochs (default: the run's).")
    pretrained: bool = Field(
        True, description="false: random weights of the backbone's shape, a 'no transfer' control."
    )

    @model_validator(mode="after")
    def _control_has_no_source(self) -> Candidate:
        if not self.pretrained and self.source:
            raise ValueError("a 'no transfer' candidate (pretrained: false) cannot have a source stage")
        return self


def _pair(value: Any) -> Any:
    """A scalar means a fixed value: [x, x]."""
    return [value, value] if isinstance(value, int | float) else value


RANGES = ("encoder_lr", "head_lr", "epochs", "warmup_ratio", "weight_decay", "dropout", "freeze_layers")


class SearchSpace(Section):
    """Ranges are [low, high] (a single number fixes the value); lists are choices."""

    encoder_lr: tuple[float, float] = Field((2e-5, 1e-4), description="Log-uniform range.")
    head_lr: tuple[float, float] = Field((1e-3, 5e-3), description="Log-uniform range.")
    batch_size: list[int] = Field([16], min_length=1, description="Choices.")
    epochs: tuple[int, int] = Field((6, 10), description="Integer range (ASHA's maximum is the high end).")
    warmup_ratio: tuple[float, float] = Field((0.0, 0.2), description="Uniform range.")
    weight_decay: tuple[float, float] = Field((0.0, 0.05), description="Uniform range.")
    dropout: tuple[float, float] = Field((0.0, 0.2), description="Uniform range.")
    pooling: list[Literal["mean", "cls"]] = Field(["mean"], min_length=1, description="Choices.")
    max_length: list[int] = Field([64], min_length=1, description="Choices.")
    freeze_layers: tuple[int, int] = Field((0, 0), description="Integer range.")

    _pairs = field_validator(*RANGES, mode="before")(_pair)

    @model_validator(mode="after")
    def _ordered(self) -> SearchSpace:
        for name in RANGES:
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"space.{name}: low {low} is above high {high}")
        if self.encoder_lr[0] <= 0 or self.head_lr[0] <= 0:
            raise ValueError("learning rates must be positive")
        if self.epochs[0] < 1 or self.freeze_layers[0] < 0:
            raise ValueError("epochs must be at least 1 and freeze_layers at least 0")
        return self


class SearchSettings(Section):
    algorithm: Literal["optuna", "random"] = Field("optuna", description="Search algorithm.")
    num_samples: int = Field(8, ge=1, description="Trials to run.")
    max_concurrent: int | None = Field(None, ge=1, description="Trials at once (unset: as resources allow).")
    metric: Literal["accuracy", "macro_f1"] = Field("accuracy", description="Validation metric to maximise.")
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


class TuneSpec(RunConfig):
    """A RunConfig (the base of every trial) plus what to search."""

    candidates: list[Candidate] = Field(
        default_factory=lambda: [Candidate(name="minilm")],
        min_length=1,
        description="Source-model choices.",
    )
    space: SearchSpace = SearchSpace()
    search: SearchSettings = SearchSettings()

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
        base = RunConfig.model_validate(self.model_dump(include=set(RunConfig.model_fields)))
        threads = max(1, int(self.search.cpus_per_trial))
        runtime = base.runtime.model_copy(update={"progress": False, "num_threads": threads})
        return base.model_copy(update={"runtime": runtime})

    def candidate(self, name: str) -> Candidate:
        return next(c for c in self.candidates if c.name == name)


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> TuneSpec:
    return load_config(path, overrides, TuneSpec)
