"""Self-training from unlabelled messages (`data.unlabelled`, `semi_supervised`).

Teachers, the labelled-data recipe trained with seeds seed, seed+1, …, label the pool; their
averaged probabilities, optionally mixed with those of each message's nearest pool messages
(`neighbours`), are the pseudo-labels. The confident ones (threshold, then at most
`max_per_intent` per intent, the most confident first) are added to the labelled rows, and a
student of the same shape as the teachers is trained on both, against the teachers' whole
probability rows (distillation, `targets: soft`) or their top intent (`hard`). Each further
round makes the last student the teacher. The student is the model that gets served.

A teacher's probabilities over the pool are cached in the registry (teachers/<key>/), keyed by
everything they depend on, so a rerun or every trial of a search shares them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.neighbors import NearestNeighbors

from transferdesk.config import RunConfig, StageConfig
from transferdesk.data import Dataset, Pool
from transferdesk.errors import TransferDeskError
from transferdesk.model.modeling import IntentModel
from transferdesk.model.network import resolve_backbone
from transferdesk.registry import Registry, TeacherRecord
from transferdesk.training.recipe import Fitted, Recipe, Run, register, timed
from transferdesk.training.trainer import Callback, FitResult, TaskData, Trainer, seed_everything

log = logging.getLogger(__name__)

# Unset max_per_intent: this many times the mean kept per intent. Generous enough that a
# naturally frequent intent keeps most of its rows, tight enough that a teacher's favourite
# intent (where it puts doubtful messages) cannot crowd out the rest.
CAP_PER_MEAN = 3.0


def teacher_stage(cfg: RunConfig) -> StageConfig:
    return cfg.semi_supervised.teacher_training or cfg.training


def student_stage(cfg: RunConfig) -> StageConfig:
    epochs = cfg.semi_supervised.student_epochs
    return cfg.training.model_copy(update={"epochs": epochs, "patience": min(cfg.training.patience, epochs)})


def _digest(texts: list[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()


def teacher_key(
    cfg: RunConfig,
    backbone: str,
    train: Dataset,
    valid: Dataset,
    pool: Pool,
    seed: int,
    pretrained: bool,
    outliers: Sequence[str] = (),
) -> str:
    """Identifies one teacher's labels: same backbone (pretrained or a random control), data
    (out-of-scope rows too), pool, settings and seed → same labels."""
    parts = {
        "backbone": resolve_backbone(backbone),
        "pretrained": pretrained,
        "train": _digest([f"{t}\t{lab}" for t, lab in zip(train.texts, train.labels, strict=True)]),
        "valid": _digest([f"{t}\t{lab}" for t, lab in zip(valid.texts, valid.labels, strict=True)]),
        "pool": _digest(pool.texts),
        # Out-of-scope rows shape a teacher only when it trains on them.
        "outliers": _digest(list(outliers)) if teacher_stage(cfg).outlier_weight > 0 else None,
        "stage": teacher_stage(cfg).model_dump(),
        "model": cfg.model.model_dump(exclude={"backbone"}),
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def teacher_labels(
    cfg: RunConfig,
    backbone: str,
    train: Dataset,
    valid: Dataset,
    pool: Pool,
    device: torch.device,
    pretrained: bool = True,
    seeds: Sequence[int] | None = None,
    outliers: Sequence[str] = (),
) -> list[TeacherRecord]:
    """Each teacher's probabilities over the pool, from the registry's cache or trained now.
    Teachers: seeds seed, seed+1, … (`semi_supervised.teachers` of them) unless `seeds`; they
    train on the out-of-scope `outliers` too (trainer.fit)."""
    registry = Registry(cfg.output)
    if seeds is None:
        seeds = range(cfg.runtime.seed, cfg.runtime.seed + cfg.semi_supervised.teachers)
    records = []
    for seed in seeds:
        key = teacher_key(cfg, backbone, train, valid, pool, seed, pretrained, outliers)
        if (cached := registry.teacher_labels(key)) is not None:
            log.info("reusing teacher labels %s (seed %d)", cached.path, seed)
            records.append(cached)
            continue
        seed_everything(seed)
        run = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"seed": seed})})
        t0, desc = time.perf_counter(), f"teacher (seed {seed})"
        trainer = Trainer.of(run, device)
        teacher, result = trainer.train(
            backbone, train, valid, teacher_stage(cfg), desc, pretrained=pretrained, outliers=outliers
        )
        probs = teacher.predict_proba(
            pool.texts, cfg.runtime.eval_batch_size, cfg.runtime.progress, f"{desc}: labelling pool"
        )
        info = {
            "labels": teacher.labels,
            "backbone": registry.portable(backbone),
            "seed": seed,
            "pool": pool.summary(registry.portable(pool.path)),
            "best_valid": result.best_metric,
            "best_epoch": result.best_epoch,
            "seconds": time.perf_counter() - t0,
        }
        records.append(registry.save_teacher_labels(key, pool.texts, probs, info))
    return records


def select_pseudo_labels(probs: np.ndarray, threshold: float, max_per_intent: int | None) -> np.ndarray:
    """Rows of `probs` kept as pseudo-labels: top probability at least `threshold`, then at most
    `max_per_intent` per top intent, the most confident first (unset: CAP_PER_MEAN × the mean
    kept per intent). Sorted row indices."""
    confidence, top = probs.max(axis=1), probs.argmax(axis=1)
    confident = np.flatnonzero(confidence >= threshold)
    cap = max_per_intent or max(1, math.ceil(CAP_PER_MEAN * len(confident) / probs.shape[1]))
    kept = []
    for intent in np.unique(top[confident]):
        rows = confident[top[confident] == intent]
        kept.append(rows[np.argsort(-confidence[rows], kind="stable")[:cap]])
    return np.sort(np.concatenate(kept)) if kept else np.zeros(0, dtype=int)


@dataclass
class SelfTrainingResult:
    model: IntentModel
    fit: FitResult  # of the round whose student this is
    rounds: list[dict] = field(default_factory=list)  # what each round kept and learnt
    seconds: float = 0.0


def pool_neighbours(cfg: RunConfig, backbone: str, texts: list[str], device: torch.device) -> np.ndarray:
    """Each pool message's `semi_supervised.neighbours` nearest other pool messages (rows ×
    k indices, nearest first) by cosine similarity of `backbone`'s embeddings: the encoder the
    student starts from (after the source or contrastive stage, if any), before fine-tuning,
    so its geometry owes nothing to what the teachers got wrong."""
    k = min(cfg.semi_supervised.neighbours, len(texts) - 1)
    if k < 1:
        return np.zeros((len(texts), 0), dtype=np.int64)
    # The encoder alone is used: its one-intent head never runs.
    encoder = IntentModel.from_backbone(backbone, ["_"], cfg.model, device)
    embeddings = encoder.embed(texts, cfg.runtime.eval_batch_size, cfg.runtime.progress, "embedding pool")
    return NearestNeighbors(n_neighbors=k, metric="cosine").fit(embeddings).kneighbors(return_distance=False)


def smooth(probs: np.ndarray, neighbours: np.ndarray | None, weight: float) -> np.ndarray:
    """Each row's probabilities mixed with the mean of its neighbours' (None: as they are)."""
    if neighbours is None or not neighbours.shape[1]:
        return probs
    return (1 - weight) * probs + weight * probs[neighbours].mean(axis=1)


def _student_data(
    train: Dataset, labels: list[str], pool_texts: list[str], probs: np.ndarray, rows: np.ndarray, soft: bool
) -> tuple[Dataset, torch.Tensor]:
    """Labelled rows (one-hot targets) followed by the kept pool rows (the teachers' targets)."""
    index = {lab: i for i, lab in enumerate(labels)}
    eye = np.eye(len(labels), dtype=np.float32)
    top = probs[rows].argmax(axis=1)
    pseudo = probs[rows] / probs[rows].sum(axis=1, keepdims=True) if soft else eye[top]
    targets = np.concatenate([eye[[index[lab] for lab in train.labels]], pseudo])
    pseudo_rows = Dataset(
        [pool_texts[i] for i in rows],
        [labels[j] for j in top],
        [-(i + 1) for i in rows],  # negative: a pool row, not a line of the file
    )
    return train.plus(pseudo_rows), torch.from_numpy(targets)


def self_train(
    cfg: RunConfig,
    backbone: str,
    train: Dataset,
    valid: Dataset,
    teachers: list[TeacherRecord],
    device: torch.device,
    pretrained: bool = True,
    callbacks: list[Callback] | None = None,
    log_dir: Path | None = None,
    tasks: TaskData | None = None,
    outliers: Sequence[str] = (),
) -> SelfTrainingResult:
    """Train the student(s) from the teachers' labels (and the other tasks' heads: the teachers
    label intents only; and the out-of-scope `outliers`); returns the student of the round with
    the best validation score (a later round can drift, learning its own mistakes)."""
    semi = cfg.semi_supervised
    labels = train.intents
    for record in teachers:
        if record.info["labels"] != labels:
            raise TransferDeskError(
                f"teacher labels {record.path} are for other intents than the training data; "
                "delete that directory to label the pool again"
            )
    pool_texts = teachers[0].texts
    probs = np.mean([r.probs for r in teachers], axis=0)
    teacher_top = probs.argmax(axis=1)
    t0, rounds = time.perf_counter(), []
    neighbours = None
    if semi.neighbours and not pretrained:
        log.warning(
            "semi_supervised.neighbours ignored: a randomly initialised encoder's neighbours mean nothing"
        )
    elif semi.neighbours:
        neighbours = pool_neighbours(cfg, backbone, pool_texts, device)
    best: tuple[IntentModel, FitResult] | None = None
    for number in range(1, semi.rounds + 1):
        raw_top, probs = probs.argmax(axis=1), smooth(probs, neighbours, semi.neighbour_weight)
        rows = select_pseudo_labels(probs, semi.threshold, semi.max_per_intent)
        if not len(rows):
            raise TransferDeskError(
                f"round {number}: no pool message reaches the pseudo-label threshold "
                f"{semi.threshold} (teachers' top probability: median "
                f"{float(np.median(probs.max(axis=1))):.2f}); lower semi_supervised.threshold"
            )
        data, targets = _student_data(train, labels, pool_texts, probs, rows, semi.targets == "soft")
        seed_everything(cfg.runtime.seed)
        model, result = Trainer.of(cfg, device).train(
            backbone,
            data,
            valid,
            student_stage(cfg),
            f"student {number}",
            log_dir=log_dir,
            pretrained=pretrained,
            callbacks=callbacks or (),
            soft_targets=targets,
            tasks=tasks,
            outliers=outliers,
        )
        student_probs = model.predict_proba(
            pool_texts, cfg.runtime.eval_batch_size, cfg.runtime.progress, f"student {number}: labelling pool"
        )
        student_top = student_probs.argmax(axis=1)
        per_intent = np.bincount(probs[rows].argmax(axis=1), minlength=len(labels))
        rounds.append(
            {
                "round": number,
                "pseudo_labels": len(rows),
                "pool": len(pool_texts),
                "per_intent": {"min": int(per_intent.min()), "max": int(per_intent.max())},
                # Pool rows whose top intent the neighbours changed.
                "smoothed": float(np.mean(probs.argmax(axis=1) != raw_top)),
                # Of the kept rows, how often the student ends up agreeing with its teacher,
                # and (all rows) with the first teachers: how far the rounds drifted.
                "agreement_with_teacher": float(np.mean(student_top[rows] == probs[rows].argmax(axis=1))),
                "agreement_with_first_teachers": float(np.mean(student_top == teacher_top)),
                "best_valid": result.best_metric,
                "best_epoch": result.best_epoch,
                "seconds": result.seconds,
            }
        )
        log.info(
            "student %d: %d pseudo-labels of %d pool messages, best valid %.4f",
            number,
            len(rows),
            len(pool_texts),
            result.best_metric,
        )
        probs = student_probs
        if best is None or result.best_metric > best[1].best_metric:
            best = model, result
    return SelfTrainingResult(*best, rounds, time.perf_counter() - t0)


def semi_supervised_record(
    cfg: RunConfig,
    pool: Pool,
    teachers: list[TeacherRecord],
    rounds: list[dict],
    registry: Registry,
    contrastive_encoder: str | None = None,
) -> dict:
    """What metrics.json and the model card say the model learnt from (teachers and rounds:
    none where the pool served only the contrastive pre-training, whose encoder is
    `contrastive_encoder`)."""
    return {
        "pool": pool.summary(registry.portable(pool.path)),
        "contrastive_encoder": registry.portable(contrastive_encoder),
        "settings": cfg.semi_supervised.model_dump(exclude={"teacher_training"})
        | {"teacher_backbone": registry.portable(cfg.semi_supervised.teacher_backbone)},
        "teachers": [
            {
                "seed": t.info["seed"],
                "backbone": t.info.get("backbone"),  # absent from labels cached before it was recorded
                "best_valid": t.info["best_valid"],
                "labels": registry.portable(t.path),
            }
            for t in teachers
        ],
        "rounds": rounds,
    }


def cached_teachers(registry: Registry, keys: list[str]) -> list[TeacherRecord]:
    """The teachers' pool labels a preparation left in the registry's cache."""
    records = [registry.teacher_labels(key) for key in keys]
    if any(r is None for r in records):
        raise TransferDeskError(f"teacher labels {keys} vanished from {registry.root / 'teachers'}")
    return records


@register
class SelfTraining(Recipe):
    """Prepares the teachers' labels of the pool (`semi_supervised.teachers` of them, each
    cached); fits the student(s) on the labelled rows plus the confident pseudo-labels."""

    name = "self_training"

    def check(self, run: Run) -> None:
        if run.splits.pool is None:
            raise TransferDeskError("recipe self_training needs an unlabelled pool: set data.unlabelled")
        if teacher := run.cfg.semi_supervised.teacher_backbone:
            resolve_backbone(teacher)  # a wrong path fails before any stage trains

    def prepare(self, run: Run) -> None:
        start, splits = time.perf_counter(), run.splits
        teacher = run.cfg.semi_supervised.teacher_backbone or run.prepared.backbone
        records = teacher_labels(
            run.cfg,
            teacher,
            splits.train,
            splits.valid,
            splits.pool,
            run.device,
            run.pretrained,
            outliers=splits.outliers,
        )
        run.prepared.teachers = [record.path.name for record in records]
        timed(run.prepared.timings, "teacher_seconds", start)

    def fit(self, run: Run) -> Fitted:
        teachers = cached_teachers(run.registry, run.prepared.teachers[: run.cfg.semi_supervised.teachers])
        outcome = self_train(
            run.cfg,
            run.prepared.backbone,
            run.splits.train,
            run.splits.valid,
            teachers,
            run.device,
            pretrained=run.pretrained,
            callbacks=run.callbacks,
            log_dir=run.log_dir,
            tasks=run.tasks(),
            outliers=run.splits.outliers,
        )
        taught = run.prepared.timings.get("teacher_seconds", 0.0)
        timings = {"student_seconds": outcome.seconds, "train_seconds": taught + outcome.seconds}
        return Fitted(outcome.model, outcome.fit, timings, {"rounds": outcome.rounds})
