"""The model card (`model_card.md`): a short human summary of a version."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from transferdesk.config import RunConfig
from transferdesk.model.confidence import INTERVAL_CONFIDENCE

if TYPE_CHECKING:
    from transferdesk.registry.versions import SavesPretrained, VersionMeta

log = logging.getLogger(__name__)


def _outliers_note(meta: VersionMeta) -> str:
    return f"; {meta.outlier_examples} out-of-scope ones taught as outliers" if meta.outlier_examples else ""


OBJECTIVES = {"cross_entropy": "cross-entropy", "supcon": "cross-entropy plus supervised contrastive loss"}


def model_card(cfg: RunConfig, version: str, meta: VersionMeta, metrics: dict, model: SavesPretrained) -> str:
    test = metrics.get("test", {})
    lines = [
        f"# {cfg.name} {version}",
        "",
        f"Intent classifier: {meta.backbone} encoder ({cfg.model.pooling} pooling) + linear head, "
        f"fine-tuned with AdamW and {OBJECTIVES[cfg.training.objective]}.",
        "",
        f"- Target data: `{cfg.data.train}`{''.join(f' + `{path}`' for path in cfg.data.extra_train)} "
        f"({meta.train_examples} examples, {len(meta.labels)} intents{_outliers_note(meta)})",
        f"- Source stage: {'`' + meta.source + '`' if meta.source else 'none'}",
        *_warm_start_lines(metrics.get("warm_start")),
        *_confidence_lines(cfg, model, metrics),
        *_task_lines(cfg, meta, test),
        f"- Training time: {meta.timings.get('train_seconds', 0):.0f} s on {meta.device}",
    ]
    if semi := metrics.get("semi_supervised"):
        pool, settings = semi["pool"], semi["settings"]
        uses = []
        if semi.get("contrastive_encoder"):  # absent from versions made before it existed
            uses.append(
                f"contrastive pre-training on it first ({cfg.contrastive.epochs} epoch(s), "
                f"encoder `{semi['contrastive_encoder']}`)"
            )
        if semi["teachers"]:
            teachers = f"{len(semi['teachers'])} teacher(s)"
            if settings.get("teacher_backbone"):
                teachers += f" fine-tuned from `{settings['teacher_backbone']}`"
            uses.append(
                f"{teachers}, {settings['rounds']} round(s), {settings['targets']} targets, "
                f"threshold {settings['threshold']}"
                # absent from versions made before neighbours existed
                + (
                    f", each message's probabilities mixed with its {n} nearest"
                    if (n := settings.get("neighbours"))
                    else ""
                )
            )
        lines.append(
            f"- Unlabelled pool: `{pool['file']}` ({pool['rows_used']} of {pool['rows_read']} messages used, "
            f"sha256 {pool['sha256'][:12]}); {'; '.join(uses)}"
        )
        if semi["rounds"]:
            kept = ", ".join(
                f"{r['pseudo_labels']} ({r['agreement_with_teacher']:.1%})" for r in semi["rounds"]
            )
            lines.append(f"- Pseudo-labels kept per round (and the student's agreement with them): {kept}")
    if meta.candidate:
        lines.append(f"- Chosen by a Ray Tune search: candidate `{meta.candidate}` (see search/)")
    if test:
        lines.append(
            f"- Test accuracy {test['accuracy']:.2%}, macro-F1 {test['macro_f1']:.2%} on `{test['data']}`"
        )
    lines += [
        "",
        "Intended use: routing customer messages; low-confidence predictions should "
        "go to a human agent. Evaluate on your own traffic before relying on it.",
    ]
    return "\n".join(lines) + "\n"


def _warm_start_lines(record: dict | None) -> list[str]:
    """Where a warm start began and what it changed (recipe warm_start)."""
    if not record:
        return []
    added = ", ".join(f"`{intent}` ({n} examples)" for intent, n in record["added"].items()) or "none"
    changes = [f"intents added: {added}"]
    changes += [f"`{old}` renamed `{new}`" for old, new in record["renamed"].items()]
    changes += [
        f"{', '.join(f'`{i}`' for i in old)} merged into `{new}`" for new, old in record["merged"].items()
    ]
    changes += [f"`{intent}` removed" for intent in record["removed"]]
    return [
        f"- Warm start from `{record['parent']}` (manifest sha256 {record['parent_manifest_sha256'][:12]}), "
        f"its encoder and heads kept, {record['epochs']} epoch(s) with it as a teacher "
        f"(weight {record['teacher_weight']}): {'; '.join(changes)}"
    ]


def _confidence_lines(cfg: RunConfig, model: SavesPretrained, metrics: dict) -> list[str]:
    """How confidences were calibrated and the hand-off threshold chosen, and what it did on test."""
    chosen, target = metrics.get("calibration") or {}, cfg.calibration
    goal = target.target if target.value is None else f"{target.target} {target.value}"
    lines = [
        f"- Out-of-scope threshold: {model.threshold:.3f} on the {target.score} score (below it → "
        f"`{model.oos_label}`, a human), chosen on validation data for target `{goal}`"
    ]
    if chosen:
        lines.append(
            f"- Calibration: temperature {chosen['fitted_temperature']:.2f} (validation expected calibration "
            f"error {chosen['valid_ece_before']:.3f} → {chosen['valid_ece_after']:.3f})"
        )
    if interval := chosen.get("valid", {}).get("target_interval"):
        lines.append(
            f"- The threshold's {chosen['valid']['target']} was measured on {chosen['valid']['target_rows']} "
            f"validation row(s): on traffic like them it is likely ({INTERVAL_CONFIDENCE:.0%}) between "
            f"{interval[0]:.1%} and {interval[1]:.1%}"
        )
    if point := metrics.get("test", {}).get("operating_point"):
        recall = "" if point["oos_recall"] is None else f", out-of-scope recall {point['oos_recall']:.1%}"
        lines.append(
            f"- On test: {point['handoff_rate']:.1%} of in-scope messages handed off, routed messages "
            f"{point['precision']:.1%} right{recall}"
        )
    return lines


def _task_lines(cfg: RunConfig, meta: VersionMeta, test: dict) -> list[str]:
    """The other tasks the model predicts, and how the source task was used."""
    lines = []
    for task, labels in meta.tasks.items():
        scored = test.get("tasks", {}).get(task)
        score = (
            f"; test accuracy {scored['accuracy']:.2%}, macro-F1 {scored['macro_f1']:.2%}" if scored else ""
        )
        lines.append(
            f"- Task `{task}`: a head of its own over the shared encoder ({', '.join(labels)}){score}"
        )
    if meta.source:
        lines.append(f"- Transfer from the source task: {'joint' if 'joint' in cfg.recipe else 'sequential'}")
    return lines
