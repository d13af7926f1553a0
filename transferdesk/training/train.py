"""The recipe: an optional source stage, the few-shot target stage (or, with an unlabelled
pool, teachers and a self-trained student: self_training.py), out-of-scope calibration on
validation data, and a new registry version. The target stage trains the other tasks' heads
(data.tasks) beside the intent's, and, with source_training.mode joint, the source task's
instead of a source stage before it.

The stages are the classic BERT fine-tuning (encoder + linear head, AdamW, linear warm-up and
decay, gradient clipping; see trainer.py) plus early stopping on validation data and a head
started from class-mean embeddings, which matters when each intent has only a handful of rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from transferdesk.config import SOURCE_TASK, RunConfig
from transferdesk.data import (
    Dataset,
    Splits,
    load_splits,
    resolve_path,
    stratified_split,
    with_sample_defaults,
)
from transferdesk.evaluation.metrics import evaluate, scored_labels, scores_alone
from transferdesk.evaluation.report import write_evaluation
from transferdesk.model.confidence import INTERVAL_CONFIDENCE
from transferdesk.model.modeling import IntentModel
from transferdesk.model.network import resolve_backbone
from transferdesk.registry import Draft, ModelVersion, Registry, VersionMeta, portable_path, sha256
from transferdesk.training.contrastive import contrastive_stage
from transferdesk.training.self_training import self_train, semi_supervised_record, teacher_labels
from transferdesk.training.trainer import (
    FitResult,
    TaskData,
    configure_runtime,
    own_random_stream,
    train_stage,
)

log = logging.getLogger(__name__)

# Share of the source data held out to early-stop the source stage.
SOURCE_VALID_FRACTION = 0.1
# A target measured on validation rows so few that its interval is wider than ± this is
# worth a warning: the threshold may well miss it on new traffic (100 out-of-scope rows: ±8).
LOOSE_TARGET = 0.05


def source_key(cfg: RunConfig) -> str:
    """Identifies a source checkpoint: same backbone, data and settings → same checkpoint."""
    parts = {
        "backbone": resolve_backbone(cfg.model.backbone),
        "source_sha256": sha256(resolve_path(cfg.data.source)),
        # The joint mode's settings have no source stage: a sequential one is the same without them.
        "stage": cfg.source_training.model_dump(exclude={"mode", "weight", "keep_head"}),
        "model": cfg.model.model_dump(exclude={"backbone"}),
        "columns": [cfg.data.text_column, cfg.data.label_column, cfg.data.oos_label],
        "seed": cfg.runtime.seed,
    }
    blob = json.dumps(parts, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def source_stage(cfg: RunConfig, source: Dataset, device: torch.device) -> Path:
    """Fine-tune the backbone on the source task once; later runs reuse the (verified) checkpoint."""
    registry, key = Registry(cfg.output), source_key(cfg)
    if (cached := registry.source_checkpoint(key)) is not None:
        log.info("reusing source checkpoint %s", cached)
        return cached
    train, valid = stratified_split(source, SOURCE_VALID_FRACTION, cfg.runtime.seed)
    with own_random_stream(cfg.runtime.seed, device):
        model, result = train_stage(
            cfg.model.backbone, train, valid, cfg, cfg.source_training, device, "source stage"
        )
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


def task_data(cfg: RunConfig, splits: Splits) -> TaskData | None:
    """The heads the target stage trains besides the intent's: data.tasks, and the source task
    when it trains jointly. None: the intent's alone."""
    labels = splits.task_labels()
    weights = {task: settings.weight for task, settings in cfg.data.tasks.items()}
    own = dict(splits.own)
    if splits.source is not None and cfg.source_training.mode == "joint":
        own[SOURCE_TASK] = stratified_split(splits.source, SOURCE_VALID_FRACTION, cfg.runtime.seed)
        labels[SOURCE_TASK] = splits.source.intents
        weights[SOURCE_TASK] = cfg.source_training.weight
    return TaskData(labels, weights, own) if labels else None


def taught_outliers(cfg: RunConfig, splits: Splits) -> int:
    """Out-of-scope training rows the target stage learns from (none at outlier_weight 0)."""
    return len(splits.outliers) if cfg.training.outlier_weight > 0 else 0


@dataclass
class RunResult:
    model: IntentModel
    splits: Splits
    fit: FitResult
    source_checkpoint: Path | None
    timings: dict[str, float]
    semi_supervised: dict | None = None  # what the run learnt from its unlabelled pool
    calibration: dict | None = None  # what calibration did on validation data


def run_training(cfg: RunConfig, log_dir: Path | None = None) -> RunResult:
    """Both stages, ending with the out-of-scope threshold chosen on validation data."""
    cfg = cfg.model_copy(update={"data": with_sample_defaults(cfg.data)})
    device = configure_runtime(cfg.runtime)
    splits = load_splits(cfg.data, cfg.runtime.seed)
    log.info(
        "training on %d examples of %d intents (%s) and %d out-of-scope ones, validating on %d, device %s",
        len(splits.train),
        len(splits.intents),
        cfg.data.train,
        taught_outliers(cfg, splits),
        len(splits.valid),
        device,
    )
    learns_from_pool = splits.pool is not None and cfg.semi_supervised.enabled
    if learns_from_pool and cfg.semi_supervised.pseudo_labels and cfg.semi_supervised.teacher_backbone:
        resolve_backbone(cfg.semi_supervised.teacher_backbone)  # a wrong path fails before the source stage
    timings: dict[str, float] = {}
    backbone, checkpoint = cfg.model.backbone, None
    tasks = task_data(cfg, splits)
    if splits.source is not None and cfg.source_training.mode == "sequential":
        t0 = time.perf_counter()
        checkpoint = source_stage(cfg, splits.source, device)
        backbone = str(checkpoint)
        timings["source_seconds"] = time.perf_counter() - t0
    semi, settings = None, cfg.semi_supervised
    teachers, rounds, adapted = [], [], None
    if learns_from_pool and settings.contrastive_epochs:
        t0 = time.perf_counter()
        if adapted := contrastive_stage(cfg, backbone, splits.pool, device):
            backbone = adapted
            timings["contrastive_seconds"] = time.perf_counter() - t0
    if learns_from_pool and settings.pseudo_labels:
        t0 = time.perf_counter()
        teachers = teacher_labels(
            cfg,
            settings.teacher_backbone or backbone,
            splits.train,
            splits.valid,
            splits.pool,
            device,
            outliers=splits.outliers,
        )
        timings["teacher_seconds"] = time.perf_counter() - t0
        outcome = self_train(
            cfg,
            backbone,
            splits.train,
            splits.valid,
            teachers,
            device,
            log_dir=log_dir,
            tasks=tasks,
            outliers=splits.outliers,
        )
        model, result, rounds = outcome.model, outcome.fit, outcome.rounds
        timings["student_seconds"] = outcome.seconds
        timings["train_seconds"] = timings["teacher_seconds"] + outcome.seconds
    else:
        model, result = train_stage(
            backbone,
            splits.train,
            splits.valid,
            cfg,
            cfg.training,
            device,
            "target stage",
            log_dir,
            tasks=tasks,
            outliers=splits.outliers,
        )
        timings["train_seconds"] = result.seconds
    if learns_from_pool:
        # The stage trained for this run's pool (a source stage serves any target: apart).
        timings["train_seconds"] += timings.get("contrastive_seconds", 0.0)
        semi = semi_supervised_record(cfg, splits.pool, teachers, rounds, Registry(cfg.output), adapted)
    if SOURCE_TASK in model.tasks and not cfg.source_training.keep_head:
        model.drop_task(SOURCE_TASK)
    calibration = calibrate(model, splits, cfg)
    return RunResult(model, splits, result, checkpoint, timings, semi, calibration)


def calibrate(model: IntentModel, splits: Splits, cfg: RunConfig) -> dict:
    """Store the intents' centroids of the labelled training rows, then fit the temperature and
    choose the hand-off threshold on validation data for the run's calibration settings;
    returns what it did there (metrics.json's `calibration`)."""
    valid = splits.valid
    model.fit_centroids(splits.train.texts, splits.train.labels, cfg.runtime.eval_batch_size)
    model.calibration = cfg.calibration
    logits = model.predict_logits(valid.texts, cfg.runtime.eval_batch_size)
    before = model.calibration_error(logits, valid.labels, temperature=1.0)
    point = model.calibrate_from_logits(logits, valid.labels)
    after = model.calibration_error(logits, valid.labels)
    log.info(
        "temperature %.2f (validation ECE %.3f → %.3f); %s threshold %.3f for target %s: %.1f%% of "
        "in-scope validation messages handed off, routed ones %.1f%% right%s",
        model.temperature,
        before,
        after,
        cfg.calibration.score,
        model.threshold,
        cfg.calibration.target
        if cfg.calibration.value is None
        else f"{cfg.calibration.target} {cfg.calibration.value}",
        100 * point.handoff_rate,
        100 * point.precision,
        "" if point.oos_recall is None else f", out-of-scope recall {100 * point.oos_recall:.1f}%",
    )
    if point.target_interval and point.target_interval[1] - point.target_interval[0] > 2 * LOOSE_TARGET:
        low, high = point.target_interval
        log.warning(
            "the threshold's %s was measured on %d validation row(s): on traffic like them it is "
            "likely (%.0f%%) between %.1f%% and %.1f%%; more such rows pin it down",
            point.target,
            point.target_rows,
            100 * INTERVAL_CONFIDENCE,
            100 * low,
            100 * high,
        )
    return {
        **cfg.calibration.model_dump(mode="json"),
        "fitted_temperature": model.temperature,
        "valid_ece_before": before,
        "valid_ece_after": after,
        "valid": point.to_dict(),
    }


def score_and_publish(
    draft: Draft, model: IntentModel, cfg: RunConfig, test: Dataset | None, metrics: dict, meta: VersionMeta
) -> ModelVersion:
    """Score the test file (once, here, into the draft's test/) and seal the version."""
    if test is not None:
        scores = evaluate(model, test, cfg.runtime.eval_batch_size, cfg.runtime.progress)
        scores["data"] = portable_path(scores["data"])
        labels = scored_labels(model, "oos_recall" in scores)
        write_evaluation(scores, test, labels, draft.test_dir, f"{draft.name}: test set")
        scores = scores_alone(scores)
        metrics = {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"], "test": scores, **metrics}
        log.info(
            "test accuracy %.2f%%, macro-F1 %.2f%% (%d rows)",
            100 * scores["accuracy"],
            100 * scores["macro_f1"],
            len(test),
        )
    return draft.publish(model, cfg, meta, metrics)


def train_and_register(cfg: RunConfig) -> ModelVersion:
    """Train, score on the test file once, and publish a new registry version."""
    registry = Registry(cfg.output)
    with registry.draft(cfg.name) as draft:
        result = run_training(cfg, log_dir=draft.logs_dir)
        cfg = cfg.model_copy(update={"data": with_sample_defaults(cfg.data)})
        metrics = {
            "valid_history": result.fit.history,
            "best_epoch": result.fit.best_epoch,
            "calibration": result.calibration,
            **result.timings,
        }
        if result.semi_supervised:
            metrics["semi_supervised"] = result.semi_supervised
        checkpoint = result.source_checkpoint
        meta = VersionMeta(
            labels=result.model.labels,
            backbone=registry.portable(cfg.model.backbone),
            source=registry.portable(cfg.data.source),
            source_checkpoint=registry.portable(checkpoint),
            train_examples=len(result.splits.train),
            outlier_examples=taught_outliers(cfg, result.splits),
            tasks=result.model.tasks,
            timings=result.timings,
            device=str(result.model.device),
        )
        return score_and_publish(draft, result.model, cfg, result.splits.test, metrics, meta)
