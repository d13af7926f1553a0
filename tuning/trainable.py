"""One Ray Tune trial: fine-tune on the target task with sampled settings, reporting the
validation metric every epoch and a checkpoint whenever it improves."""

from __future__ import annotations

import tempfile

from ray import tune

from transferdesk.data import load_splits
from transferdesk.modeling import IntentModel
from transferdesk.train import configure_runtime, train_stage
from transferdesk.trainer import Callback
from tuning.config import TuneSpec
from tuning.space import trial_config

REPORTED = ("epoch", "loss", "accuracy", "macro_f1")


class TuneReport(Callback):
    """Each epoch's validation metrics to Tune; a checkpoint (the model's own files) only at
    improvements, so a trial's latest checkpoint is its best epoch."""

    def on_epoch(self, entry: dict, improved: bool, model: IntentModel) -> None:
        metrics = {key: entry[key] for key in REPORTED}
        if not improved:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def run_trial(params: dict, spec_json: str, backbones: dict[str, str]) -> None:
    spec = TuneSpec.model_validate_json(spec_json)
    candidate = spec.candidate(params["candidate"])
    cfg = trial_config(spec, params, backbones[candidate.name])
    device = configure_runtime(cfg.runtime)
    splits = load_splits(cfg.data, cfg.runtime.seed)  # train and valid only: cfg.data.test is None
    train_stage(
        cfg.model.backbone,
        splits.train,
        splits.valid,
        cfg,
        cfg.training,
        device,
        f"trial {candidate.name}",
        pretrained=candidate.pretrained,
        callbacks=[TuneReport()],
    )
