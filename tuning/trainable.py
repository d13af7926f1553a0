"""One Ray Tune trial: fine-tune on the target task with sampled settings, reporting the
validation metric every epoch and a checkpoint whenever it improves."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ray import tune

from transferdesk.data import load_splits
from transferdesk.model import TrainedModel
from transferdesk.registry import save_weights
from transferdesk.train import configure_runtime, train_stage
from tuning.config import TuneSpec
from tuning.space import trial_config

REPORTED = ("epoch", "loss", "accuracy", "macro_f1")


def run_trial(params: dict, spec_json: str, backbones: dict[str, str]) -> None:
    spec = TuneSpec.model_validate_json(spec_json)
    candidate = spec.candidate(params["candidate"])
    cfg = trial_config(spec, params, backbones[candidate.name])
    device = configure_runtime(cfg.runtime)
    splits = load_splits(cfg.data, cfg.runtime.seed)  # train and valid only: cfg.data.test is None

    def report(entry: dict, improved: bool, model: TrainedModel) -> None:
        metrics = {key: entry[key] for key in REPORTED}
        if not improved:
            tune.report(metrics)
            return
        # Only improvements are saved, so a trial's latest checkpoint is its best epoch.
        with tempfile.TemporaryDirectory() as tmp:
            save_weights(model, Path(tmp))
            (Path(tmp) / "config.yaml").write_text(cfg.to_yaml())
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))

    train_stage(
        cfg.model.backbone,
        splits.train,
        splits.valid,
        cfg,
        cfg.training,
        device,
        None,
        f"trial {candidate.name}",
        pretrained=candidate.pretrained,
        on_epoch=report,
    )
