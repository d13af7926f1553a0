"""A source stage (`source_training`, mode sequential): the backbone fine-tuned first on a
source task with plenty of labels (`data.source`), then the target fit starts from its
encoder. The checkpoint is cached in the registry (sources/<key>/), keyed by everything it
depends on, so later runs and every candidate of a search that share it train it once."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from transferdesk.config import RunConfig
from transferdesk.data import Dataset, resolve_path, stratified_split
from transferdesk.errors import TransferDeskError
from transferdesk.model.network import resolve_backbone
from transferdesk.registry import sha256
from transferdesk.training.recipe import SOURCE_VALID_FRACTION, Recipe, Run, register, timed
from transferdesk.training.trainer import Trainer, own_random_stream

log = logging.getLogger(__name__)


def source_key(cfg: RunConfig) -> str:
    """Identifies a source checkpoint: same backbone, data and settings → same checkpoint."""
    parts = {
        "backbone": resolve_backbone(cfg.model.backbone),
        "source_sha256": sha256(resolve_path(cfg.data.source)),
        "stage": cfg.source_training.model_dump(),
        "model": cfg.model.model_dump(exclude={"backbone"}),
        "columns": [cfg.data.text_column, cfg.data.label_column, cfg.data.oos_label],
        "seed": cfg.runtime.seed,
    }
    blob = json.dumps(parts, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def source_stage(run: Run, source: Dataset) -> Path:
    """Fine-tune the backbone on the source task once; later runs reuse the (verified) checkpoint."""
    cfg, registry, key = run.cfg, run.registry, source_key(run.cfg)
    if (cached := registry.source_checkpoint(key)) is not None:
        log.info("reusing source checkpoint %s", cached)
        return cached
    train, valid = stratified_split(source, SOURCE_VALID_FRACTION, cfg.runtime.seed)
    with own_random_stream(cfg.runtime.seed, run.device):
        trainer = Trainer.of(cfg, run.device)
        model, result = trainer.train(cfg.model.backbone, train, valid, cfg.source_training, "source stage")
    info = {
        "backbone": registry.portable(cfg.model.backbone),
        "source": registry.portable(cfg.data.source),
        "source_sha256": sha256(resolve_path(cfg.data.source)),
        "intents": len(source.intents),
        "examples": len(source),
        "best_valid": result.best_metric,
        "epochs_run": result.epochs_run,
        "seconds": result.seconds,
        "settings": cfg.source_training.model_dump(),
    }
    return registry.save_source(model, key, info)


@register
class SourceStage(Recipe):
    name = "source"

    def check(self, run: Run) -> None:
        if run.splits.source is None:
            raise TransferDeskError("recipe source needs a source task: set data.source")

    def prepare(self, run: Run) -> None:
        start = time.perf_counter()
        checkpoint = source_stage(run, run.splits.source)
        run.prepared.backbone = run.prepared.source_checkpoint = str(checkpoint)
        timed(run.prepared.timings, "source_seconds", start)
