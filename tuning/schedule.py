"""Early stopping for the search: ASHA, except for the baseline trials."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler


def is_baseline(params: dict[str, Any], baselines: Sequence[dict[str, Any]]) -> bool:
    """Whether a trial's sampled values are one of the baseline points."""
    return any(all(params.get(k) == v for k, v in point.items()) for point in baselines)


class BaselineExemptASHA(ASHAScheduler):
    """ASHA that lets the baseline trials (the untuned recipe on each candidate) run to their
    end. The report splits the gain into source model and hyperparameters by comparing
    against them, and a baseline cut after a few epochs would make that split compare a
    short run with a full one. Their results still enter the rungs, as any trial's do."""

    def __init__(self, baselines: Sequence[dict[str, Any]], **kwargs: Any):
        super().__init__(**kwargs)
        self._baselines = list(baselines)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and is_baseline(trial.config, self._baselines):
            self._num_stopped -= 1
            return TrialScheduler.CONTINUE  # the trial still ends at its own last epoch
        return action
