"""`transferdesk train`: a run's recipe (recipe.py) prepared and fitted, then the ending every
run shares, a Tune search's export too: the joint source head dropped, out-of-scope calibration
on validation data, the test file scored once, and a new registry version published."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transferdesk.config import SOURCE_TASK, RunConfig
from transferdesk.data import Dataset, Splits, with_sample_defaults
from transferdesk.evaluation.drift import intent_mix
from transferdesk.evaluation.metrics import evaluate, scored_labels, scores_alone
from transferdesk.evaluation.report import write_evaluation
from transferdesk.model.confidence import INTERVAL_CONFIDENCE
from transferdesk.model.modeling import IntentModel
from transferdesk.model.multi_intent import best_cuts, choose_threshold
from transferdesk.registry import Draft, ModelVersion, Registry, VersionMeta, portable_path
from transferdesk.training.chain import fit, load_run, prepare
from transferdesk.training.recipe import Run
from transferdesk.training.recipes.self_training import cached_teachers, semi_supervised_record
from transferdesk.training.trainer import FitResult

log = logging.getLogger(__name__)

# A target measured on validation rows so few that its interval is wider than ± this is
# worth a warning: the threshold may well miss it on new traffic (100 out-of-scope rows: ±8).
LOOSE_TARGET = 0.05


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
    record: dict = field(default_factory=dict)  # what the recipe adds to metrics.json


def learns_from_pool(run: Run) -> bool:
    return run.splits.pool is not None and run.cfg.semi_supervised.enabled


def pool_record(run: Run, rounds: list[dict]) -> dict:
    """What metrics.json and the model card say the model learnt from its pool."""
    teachers = cached_teachers(run.registry, run.prepared.teachers[: run.cfg.semi_supervised.teachers])
    return semi_supervised_record(
        run.cfg, run.splits.pool, teachers, rounds, run.registry, run.prepared.adapted
    )


def finish(model: IntentModel, splits: Splits, cfg: RunConfig) -> dict:
    """The ending of every run's training: a joint source head dropped unless kept, then
    calibration (see `calibrate`); returns what calibration did."""
    if SOURCE_TASK in model.tasks and not cfg.joint.keep_head:
        model.drop_task(SOURCE_TASK)
    return calibrate(model, splits, cfg)


def run_training(cfg: RunConfig, log_dir: Path | None = None) -> RunResult:
    """The run's recipe, prepared and fitted, ending with the out-of-scope threshold chosen on
    validation data."""
    run = load_run(cfg, log_dir=log_dir)
    splits = run.splits
    log.info(
        "training on %d examples of %d intents (%s) and %d out-of-scope ones, validating on %d, device %s",
        len(splits.train),
        len(splits.intents),
        run.cfg.data.train,
        taught_outliers(run.cfg, splits),
        len(splits.valid),
        run.device,
    )
    fitted = fit(run, prepare(run))
    timings = {**run.prepared.timings, **fitted.timings}
    record = dict(fitted.record)
    rounds = record.pop("rounds", [])
    semi = None
    if learns_from_pool(run):
        # The stage trained for this run's pool (a source stage serves any target: apart).
        timings["train_seconds"] += timings.get("contrastive_seconds", 0.0)
        semi = pool_record(run, rounds)
    calibration = finish(fitted.model, splits, run.cfg)
    checkpoint = run.prepared.source_checkpoint
    return RunResult(
        fitted.model, splits, fitted.fit, checkpoint and Path(checkpoint), timings, semi, calibration, record
    )


def calibrate(model: IntentModel, splits: Splits, cfg: RunConfig) -> dict:
    """Store the intents' centroids of the labelled training rows, then fit the temperature and
    choose the hand-off threshold on validation data for the run's calibration settings;
    returns what it did there (metrics.json's `calibration`)."""
    valid = splits.valid
    model.fit_scores(splits.train.texts, splits.train.labels, cfg.runtime.eval_batch_size)
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
        # What the served version's live mix of decisions is compared with (drift): the top
        # intent, or the out-of-scope label below the threshold, as the service decides, of
        # every validation row, out-of-scope ones included.
        "valid_intent_mix": intent_mix(model.decide(model.split_heads(logits))),
        "valid_rows": len(valid),
        **calibrate_multi_intent(model, valid, cfg),
    }


def calibrate_multi_intent(model: IntentModel, valid: Dataset, cfg: RunConfig) -> dict:
    """Where the run asks for it (calibration.multi_intent_rows), the threshold above which a
    message holds two requests, chosen on in-scope validation messages (a seeded sample), all
    of them single requests: at most calibration.multi_intent_single_rate of them split."""
    settings = cfg.calibration
    known = [text for text, label in zip(valid.texts, valid.labels, strict=True) if label in model.labels]
    if not settings.multi_intent_rows or not known:
        return {}
    rng = np.random.default_rng(cfg.runtime.seed)
    rows = rng.choice(len(known), min(settings.multi_intent_rows, len(known)), replace=False)
    singles = best_cuts(model, [known[i] for i in rows], cfg.runtime.eval_batch_size)
    model.multi_intent_threshold = choose_threshold(singles, settings.multi_intent_single_rate)
    log.info(
        "two requests in a message above confidence %.3f in both parts (%d validation messages)",
        model.multi_intent_threshold,
        len(rows),
    )
    return {"multi_intent": {"threshold": model.multi_intent_threshold, "rows": len(rows)}}


def publish(
    draft: Draft,
    model: IntentModel,
    cfg: RunConfig,
    splits: Splits,
    metrics: dict,
    *,
    timings: dict[str, float],
    device: str,
    source_checkpoint: str | Path | None = None,
    candidate: str | None = None,
    pretrained: bool = True,
) -> ModelVersion:
    """The last step of every run, a search's export too: the version's metadata, the test
    file scored once (into the draft's test/), and the version sealed."""
    registry = Registry(draft.root)
    meta = VersionMeta(
        labels=model.labels,
        backbone=registry.portable(cfg.model.backbone),
        source=registry.portable(cfg.data.source),
        source_checkpoint=registry.portable(source_checkpoint),
        candidate=candidate,
        pretrained=pretrained,
        train_examples=len(splits.train),
        outlier_examples=taught_outliers(cfg, splits),
        tasks=model.tasks,
        timings=timings,
        device=device,
    )
    if (test := splits.test) is not None:
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
    with Registry(cfg.output).draft(cfg.name) as draft:
        result = run_training(cfg, log_dir=draft.logs_dir)
        cfg = cfg.model_copy(update={"data": with_sample_defaults(cfg.data)})
        metrics = {
            "valid_history": result.fit.history,
            "best_epoch": result.fit.best_epoch,
            "calibration": result.calibration,
            **result.timings,
            **result.record,
        }
        if result.semi_supervised:
            metrics["semi_supervised"] = result.semi_supervised
        return publish(
            draft,
            result.model,
            cfg,
            result.splits,
            metrics,
            timings=result.timings,
            device=str(result.model.device),
            source_checkpoint=result.source_checkpoint,
        )
