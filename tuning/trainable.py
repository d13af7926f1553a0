"""One Ray Tune trial: the run's recipe fitted with the sampled settings from its candidate's
preparation, reporting the validation metrics every epoch and a checkpoint whenever the
trial's best improves."""

from __future__ import annotations

import tempfile

from ray import tune

from transferdesk.model.modeling import IntentModel
from transferdesk.training.chain import fit, load_run
from transferdesk.training.trainer import Callback
from transferdesk.training.validation import selection_key
from tuning.config import TuneSpec
from tuning.prepare import Preparations, preparation
from tuning.space import trial_config

# And, where validation has out-of-scope rows, oos_auroc and accuracy_auroc (validation_score).
REPORTED = ("epoch", "loss", "accuracy", "macro_f1", "oos_auroc", "accuracy_auroc")


class TuneReport(Callback):
    """Each epoch's validation metrics to Tune; a checkpoint (the model's own files) only when
    the epoch beats the trial's best so far (the search metric, ties broken by the other
    heads' accuracy, as training picks its epoch), across all its fits (the rounds of
    self-training are several), so a trial's latest checkpoint is its best epoch."""

    def __init__(self, metric: str) -> None:
        self.metric, self.best = metric, (float("-inf"), float("-inf"))

    def on_epoch(self, entry: dict, improved: bool, model: IntentModel) -> None:
        metrics = {key: entry[key] for key in REPORTED if key in entry}
        key = selection_key(entry, self.metric, model.tasks)
        if key <= self.best:
            tune.report(metrics)
            return
        self.best = key
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def run_trial(params: dict, spec_json: str, preparations: Preparations) -> None:
    spec = TuneSpec.model_validate_json(spec_json)
    candidate = spec.candidate(params["candidate"])
    cfg = trial_config(spec, params)
    prepared = preparation(preparations, cfg, candidate.name)
    # Training and validation data only (and a joint source task's): the pool is in the
    # teachers' labels, a sequential source in the prepared encoder.
    data = cfg.data.model_copy(update={"source": candidate.joint_source, "unlabelled": None})
    run = load_run(cfg, candidate.pretrained, data=data, prepared=prepared)
    run.callbacks.append(TuneReport(spec.search.metric))
    fit(run)
