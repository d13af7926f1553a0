"""From the tuning config to Ray Tune's search space, and from a sampled point back to the
RunConfig a trial trains with. What is searchable, and how, is tuning.config.SEARCHABLE."""

from __future__ import annotations

from typing import Any

from ray import tune
from ray.tune.search.sample import Domain

from transferdesk.config import RunConfig
from transferdesk.training.recipes.self_training import teacher_stage
from tuning.config import COMPARED, SEARCHABLE, Candidate, Searchable, TuneSpec


def _domain(knob: Searchable, value: Any) -> Any:
    if knob.scale == "choice":
        return tune.choice(value) if len(value) > 1 else value[0]
    low, high = value
    if low == high:
        return low
    if knob.scale == "int":
        return tune.randint(low, high + 1)  # randint's upper bound is exclusive
    return tune.loguniform(low, high) if knob.scale == "log" else tune.uniform(low, high)


def param_space(spec: TuneSpec) -> dict[str, Any]:
    space = {name: _domain(knob, getattr(spec.space, name)) for name, knob in SEARCHABLE.items()}
    names = [c.name for c in spec.candidates]
    space["candidate"] = tune.choice(names) if len(names) > 1 else names[0]
    return space


def _clip(value: Any, knob: Searchable, domain: Any) -> Any:
    if knob.scale == "choice":
        return value if value in domain else domain[0]
    low, high = domain
    return min(max(value, low), high)


def _get(cfg: RunConfig, dotted: str) -> Any:
    section, field = dotted.split(".")
    return getattr(getattr(cfg, section), field)


def baseline_points(spec: TuneSpec) -> list[dict[str, Any]]:
    """The run's own settings (clipped into the space) once per candidate and per choice of
    each COMPARED setting: the trials that tell what the search added over the untuned
    recipe, and what each source model (and the unlabelled pool) adds."""
    base = spec.base_run()
    searched = {name for name, value in param_space(spec).items() if isinstance(value, Domain)}
    points = [
        {
            name: _clip(_get(base, knob.target), knob, getattr(spec.space, name))
            for name, knob in SEARCHABLE.items()
            if name in searched  # fixed values are not part of the search algorithm's space
        }
    ]
    for name in (n for n in COMPARED if n in searched):
        points = [{**p, name: value} for value in getattr(spec.space, name) for p in points]
    if "candidate" in searched:
        points = [{**p, "candidate": c.name} for c in spec.candidates for p in points]
    return points


def candidate_config(spec: TuneSpec, candidate: Candidate) -> RunConfig:
    """The run settings of a candidate's preparation: the run's own, with its backbone and
    source stage; no test file (trials never read it) unless a pool must be kept apart from it."""
    base = spec.base_run()
    stage = base.source_training.model_copy(
        update={
            "objective": candidate.objective,
            "epochs": candidate.source_epochs or base.source_training.epochs,
        }
    )
    data = base.data.model_copy(update={"source": candidate.source})
    cfg = base.model_copy(
        update={
            "model": base.model.model_copy(update={"backbone": candidate.backbone}),
            "data": data,
            "source_training": stage,
        }
    )
    if candidate.transfer == "joint":  # the source task beside the target instead of before it
        cfg = cfg.with_joint_transfer()
    return cfg


def trial_config(spec: TuneSpec, params: dict[str, Any]) -> RunConfig:
    """The RunConfig of one trial: its candidate's run (`candidate_config`) with the sampled
    values, never the test file. Its teachers keep the run's own training settings, whatever
    the trial samples, so that all trials share them (tuning.prepare)."""
    candidate = spec.candidate(params["candidate"])
    base = candidate_config(spec, candidate)
    data = base.model_dump()
    for name, knob in SEARCHABLE.items():
        section, field = knob.target.split(".")
        # A setting added since a resumed search started keeps the run's own value.
        data[section][field] = params.get(name, data[section][field])
    data["data"]["test"] = None
    if spec.uses_pool():
        data["semi_supervised"]["teacher_training"] = teacher_stage(spec.base_run()).model_dump()
    return RunConfig.model_validate(data)
