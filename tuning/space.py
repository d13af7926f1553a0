"""From the tuning config to Ray Tune's search space, and from a sampled point back to the
RunConfig a trial trains with."""

from __future__ import annotations

from typing import Any

from ray import tune
from ray.tune.search.sample import Domain

from transferdesk.config import RunConfig
from tuning.config import TuneSpec

LOG_SCALE = {"encoder_lr", "head_lr"}
INT_RANGES = {"epochs", "freeze_layers"}
# Sampled name → where it lands in the RunConfig.
TARGETS = {
    "encoder_lr": "training.encoder_lr",
    "head_lr": "training.head_lr",
    "batch_size": "training.batch_size",
    "epochs": "training.epochs",
    "warmup_ratio": "training.warmup_ratio",
    "weight_decay": "training.weight_decay",
    "freeze_layers": "training.freeze_layers",
    "dropout": "model.dropout",
    "pooling": "model.pooling",
    "max_length": "model.max_length",
}


def _domain(name: str, value: Any) -> Any:
    if isinstance(value, list):
        return tune.choice(value) if len(value) > 1 else value[0]
    low, high = value
    if low == high:
        return low
    if name in INT_RANGES:
        return tune.randint(low, high + 1)  # randint's upper bound is exclusive
    return tune.loguniform(low, high) if name in LOG_SCALE else tune.uniform(low, high)


def param_space(spec: TuneSpec) -> dict[str, Any]:
    space = {name: _domain(name, getattr(spec.space, name)) for name in TARGETS}
    names = [c.name for c in spec.candidates]
    space["candidate"] = tune.choice(names) if len(names) > 1 else names[0]
    return space


def _clip(value: Any, domain: Any) -> Any:
    if isinstance(domain, list):
        return value if value in domain else domain[0]
    low, high = domain
    return min(max(value, low), high)


def baseline_points(spec: TuneSpec) -> list[dict[str, Any]]:
    """The run's own settings (clipped into the space) once per candidate: the trials that
    tell what the search added over the untuned recipe, and what each source model adds."""
    base = spec.base_run()
    searched = {name for name, value in param_space(spec).items() if isinstance(value, Domain)}
    recipe = {}
    for name, dotted in TARGETS.items():
        section, field = dotted.split(".")
        if name in searched:  # fixed values are not part of the search algorithm's space
            recipe[name] = _clip(getattr(getattr(base, section), field), getattr(spec.space, name))
    if "candidate" not in searched:
        return [recipe]
    return [{**recipe, "candidate": c.name} for c in spec.candidates]


def trial_config(spec: TuneSpec, params: dict[str, Any], backbone: str) -> RunConfig:
    """The RunConfig of one trial: the base run with the sampled values, never the test file."""
    data = spec.base_run().model_dump()
    for name, dotted in TARGETS.items():
        section, field = dotted.split(".")
        data[section][field] = params[name]
    data["model"]["backbone"] = backbone
    data["data"].update(test=None, source=None)  # source stages are prepared before the search
    return RunConfig.model_validate(data)
