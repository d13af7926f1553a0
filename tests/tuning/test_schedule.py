from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from tuning.schedule import BaselineExemptASHA, is_baseline

BASELINE = {"encoder_lr": 5e-5, "candidate": "minilm"}


def _scheduler() -> BaselineExemptASHA:
    scheduler = BaselineExemptASHA(
        [BASELINE], time_attr="training_iteration", max_t=8, grace_period=1, reduction_factor=2
    )
    scheduler.set_search_properties("accuracy", "max")
    return scheduler


def _decision(scheduler: BaselineExemptASHA, config: dict, accuracy: float) -> str:
    trial = Trial("__fake", config=config, stub=True)
    scheduler.on_trial_add(None, trial)
    return scheduler.on_trial_result(None, trial, {"training_iteration": 1, "accuracy": accuracy})


def test_asha_cuts_weak_trials_but_lets_baselines_finish() -> None:
    scheduler = _scheduler()
    tuned = {"encoder_lr": 1e-4, "candidate": "minilm"}
    for accuracy in (0.8, 0.85, 0.9):  # each at or above the median so far
        assert _decision(scheduler, tuned, accuracy) == TrialScheduler.CONTINUE
    weak = {"encoder_lr": 1e-9, "candidate": "minilm"}
    assert _decision(scheduler, weak, 0.1) == TrialScheduler.STOP
    assert _decision(scheduler, {**BASELINE, "epochs": 10}, 0.1) == TrialScheduler.CONTINUE
    assert "num_stopped=1" in scheduler.debug_string()  # the baseline is not counted as stopped


def test_is_baseline_matches_the_sampled_values_only() -> None:
    assert is_baseline({**BASELINE, "dropout": 0.1}, [BASELINE])
    assert not is_baseline({**BASELINE, "candidate": "other"}, [BASELINE])
    assert not is_baseline(BASELINE, [])
