"""Teachers of the candidates: each teacher's labels of the unlabelled pool, computed once, as
Ray tasks, before any trial. Every semi-supervised trial of a candidate shares them: the
teachers train with the run's own `training` settings (pinned in every trial's
`semi_supervised.teacher_training`), whatever the trial samples for its student. A candidate
has one set of teachers per `space.teacher_backbone` choice: its own encoder (null), or a
larger one, whose teachers every candidate shares."""

from __future__ import annotations

import logging

import ray

from transferdesk.config import RunConfig
from transferdesk.data import load_splits
from transferdesk.errors import TransferDeskError
from transferdesk.registry import Registry, TeacherRecord
from transferdesk.training.self_training import teacher_labels
from transferdesk.training.trainer import configure_runtime
from tuning.config import TuneSpec

log = logging.getLogger(__name__)


@ray.remote
def _label_pool(cfg_json: str, backbone: str, seed: int, pretrained: bool) -> str:
    cfg = RunConfig.model_validate_json(cfg_json)
    device = configure_runtime(cfg.runtime)
    # With the test file: the pool is checked against it like in any run (trials never read it).
    splits = load_splits(cfg.data, cfg.runtime.seed)
    (record,) = teacher_labels(
        cfg, backbone, splits.train, splits.valid, splits.pool, device, pretrained, [seed], splits.outliers
    )
    return record.path.name


# Candidate name → teacher backbone ("" for the candidate's own) → cache keys of its teachers.
Teachers = dict[str, dict[str, list[str]]]


def prepare_teachers(spec: TuneSpec, backbones: dict[str, str]) -> Teachers:
    """Every candidate's teachers for every teacher backbone choice (as many as space.teachers
    allows), each trained once."""
    if not spec.uses_pool():
        return {}
    cfg = spec.base_run()
    seeds = range(cfg.runtime.seed, cfg.runtime.seed + spec.space.teachers[1])
    task = _label_pool.options(num_cpus=spec.search.cpus_per_trial, num_gpus=spec.search.gpus_per_trial)
    refs: dict[tuple[str, bool], list[ray.ObjectRef]] = {}
    plan: dict[str, dict[str, tuple[str, bool]]] = {}
    for c in spec.candidates:
        for teacher in spec.space.teacher_backbone:
            encoder = (teacher, True) if teacher else (backbones[c.name], c.pretrained)
            if encoder not in refs:
                backbone, pretrained = encoder
                refs[encoder] = [task.remote(cfg.model_dump_json(), backbone, s, pretrained) for s in seeds]
            plan.setdefault(c.name, {})[teacher or ""] = encoder
    done = {encoder: ray.get(pending) for encoder, pending in refs.items()}
    keys = {name: {t: done[encoder] for t, encoder in choices.items()} for name, choices in plan.items()}
    log.info("teacher labels ready: %s", keys)
    return keys


def load_teachers(cfg: RunConfig, teachers: Teachers, candidate: str) -> list[TeacherRecord] | None:
    """The first `semi_supervised.teachers` of the candidate's cached teachers on the run's
    teacher backbone; None when the run learns from no pool."""
    if not cfg.semi_supervised.enabled or candidate not in teachers:
        return None
    choice = cfg.semi_supervised.teacher_backbone or ""
    if choice not in teachers[candidate]:
        raise TransferDeskError(
            f"no teachers on {choice} were prepared for candidate {candidate} (the search space "
            "changed since the search started?); run the search again under a new --name"
        )
    keys = teachers[candidate][choice]
    registry = Registry(cfg.output)
    records = [registry.teacher_labels(key) for key in keys[: cfg.semi_supervised.teachers]]
    if any(r is None for r in records):
        raise RuntimeError(
            f"teacher labels {keys} vanished from {registry.root / 'teachers'} during the search"
        )
    return records
