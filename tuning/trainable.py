"""One Ray Tune trial: fine-tune on the target task with sampled settings, reporting the
validation metric every epoch and a checkpoint whenever it improves."""

from __future__ import annotations

import tempfile

from ray import tune

from transferdesk.data import load_splits
from transferdesk.model.modeling import IntentModel
from transferdesk.training.self_training import self_train
from transferdesk.training.train import task_data
from transferdesk.training.trainer import Callback, configure_runtime, selection_key, train_stage
from tuning.config import TuneSpec
from tuning.space import trial_config
from tuning.teachers import Teachers, load_teachers

# And, where validation has out-of-scope rows, oos_auroc and accuracy_auroc (trainer.validation_score).
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


def run_trial(params: dict, spec_json: str, backbones: dict[str, str], teachers: Teachers) -> None:
    spec = TuneSpec.model_validate_json(spec_json)
    candidate = spec.candidate(params["candidate"])
    cfg = trial_config(spec, params, backbones[candidate.name])
    device = configure_runtime(cfg.runtime)
    splits = load_splits(cfg.data, cfg.runtime.seed)  # train and valid only: cfg.data.test is None
    tasks = task_data(cfg, splits)
    if records := load_teachers(cfg, teachers, candidate.name):
        self_train(
            cfg,
            cfg.model.backbone,
            splits.train,
            splits.valid,
            records,
            device,
            pretrained=candidate.pretrained,
            callbacks=[TuneReport(spec.search.metric)],
            tasks=tasks,
            outliers=splits.outliers,
        )
        return
    train_stage(
        cfg.model.backbone,
        splits.train,
        splits.valid,
        cfg,
        cfg.training,
        device,
        f"trial {candidate.name}",
        pretrained=candidate.pretrained,
        callbacks=[TuneReport(spec.search.metric)],
        tasks=tasks,
        outliers=splits.outliers,
    )
