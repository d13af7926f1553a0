"""How a run goes through its recipe: the chain of methods its configuration names (or its
data implies), resolved by name, checked, prepared and fitted (see recipe.py)."""

from __future__ import annotations

import importlib
from pathlib import Path

from transferdesk.config import DataConfig, RunConfig
from transferdesk.data import load_splits, with_sample_defaults
from transferdesk.errors import TransferDeskError
from transferdesk.training.recipe import RECIPES, Fitted, Prepared, Recipe, Run
from transferdesk.training.recipes import BUILT_IN
from transferdesk.training.trainer import configure_runtime

__all__ = ["BUILT_IN", "chain", "fit", "load_run", "prepare", "prepares", "resolve"]


def resolve(name: str) -> Recipe:
    """A registered method (`recipes/`), or one outside the package named `module:Class`."""
    if ":" in name:
        module, _, attribute = name.partition(":")
        try:
            return getattr(importlib.import_module(module), attribute)()
        except (ImportError, AttributeError) as err:
            raise TransferDeskError(f"recipe {name!r} cannot be imported: {err}") from None
    if name not in RECIPES:
        raise TransferDeskError(f"unknown recipe {name!r}; registered: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]()


def chain(cfg: RunConfig) -> list[Recipe]:
    return [resolve(name) for name in cfg.methods()]


def load_run(
    cfg: RunConfig,
    pretrained: bool = True,
    log_dir: Path | None = None,
    data: DataConfig | None = None,
    prepared: Prepared | None = None,
) -> Run:
    """Seed everything, pick the device, load and check the data (`data`: other files than the
    run's, e.g. fewer): a run ready to prepare, or to fit from what was `prepared` before."""
    cfg = cfg.model_copy(update={"data": with_sample_defaults(cfg.data)})
    device = configure_runtime(cfg.runtime)
    splits = load_splits(data or cfg.data, cfg.runtime.seed)
    prepared = prepared or Prepared(cfg.model.backbone)
    return Run(cfg, splits, device, prepared, pretrained, log_dir=log_dir)


def prepare(run: Run) -> list[Recipe]:
    """Check every method of the run's chain, then let each prepare; returns the chain."""
    methods = chain(run.cfg)
    for method in methods:
        method.check(run)
    for method in methods:
        method.prepare(run)
    return methods


def prepares(cfg: RunConfig) -> bool:
    """Whether any method of the run's chain has work to prepare."""
    return any(type(method).prepare is not Recipe.prepare for method in chain(cfg))


def fit(run: Run, methods: list[Recipe] | None = None) -> Fitted:
    """The model of the last method of the chain that fits one."""
    for method in reversed(methods or chain(run.cfg)):
        if (fitted := method.fit(run)) is not None:
            return fitted
    raise TransferDeskError(f"no method of the recipe {run.cfg.recipe} fits a model; end it with finetune")
