"""Before any trial: each candidate's preparation (its recipe's `prepare`: a source stage, a
pool's contrastive stage, teachers' labels of the pool), run once as Ray tasks with the run's
own settings, whatever a trial samples, so that every trial of a candidate fits from the same
prepared encoder and teachers. Everything prepared is cached in the registry: candidates that
share a source stage, and later searches, train it once.

A candidate has one preparation per choice that changes what is prepared: with or without the
pool (`space.semi_supervised`), and on which encoder its teachers train (`space.teacher_backbone`:
its own, or a larger one); as many teachers as `space.teachers` allows (a trial uses the first
`semi_supervised.teachers`)."""

from __future__ import annotations

import logging

import ray

from transferdesk.config import RunConfig
from transferdesk.errors import TransferDeskError
from transferdesk.training.chain import load_run, prepare, prepares
from transferdesk.training.recipe import Prepared
from tuning.config import Candidate, TuneSpec
from tuning.space import candidate_config

log = logging.getLogger(__name__)

# (candidate, teacher backbone or "" for the candidate's own, learns from the pool) → Prepared
Preparations = dict[tuple[str, str, bool], Prepared]


def preparation_key(cfg: RunConfig, candidate: str) -> tuple[str, str, bool]:
    """Which preparation a run of `candidate` with these settings fits from."""
    pool = cfg.data.unlabelled is not None and cfg.semi_supervised.enabled
    return candidate, (cfg.semi_supervised.teacher_backbone or "") if pool else "", pool


def _preparation_config(spec: TuneSpec, candidate: Candidate, teacher: str | None, pool: bool) -> RunConfig:
    cfg = candidate_config(spec, candidate)
    semi = cfg.semi_supervised.model_copy(
        update={"enabled": pool, "teacher_backbone": teacher, "teachers": spec.space.teachers[1]}
    )
    data = cfg.data.model_copy(update={"test": cfg.data.test if pool else None})
    return cfg.model_copy(update={"semi_supervised": semi, "data": data})


@ray.remote
def _prepare(cfg_json: str, pretrained: bool) -> Prepared:
    run = load_run(RunConfig.model_validate_json(cfg_json), pretrained)
    prepare(run)
    return run.prepared


def prepare_candidates(spec: TuneSpec) -> Preparations:
    """Every preparation a trial can ask for, each computed once. Those without the pool go
    first: a source stage is then cached before the preparations that teach from it start."""
    task = _prepare.options(num_cpus=spec.search.cpus_per_trial, num_gpus=spec.search.gpus_per_trial)
    pools = [False, True] if spec.uses_pool() else [False]
    done: dict[str, Prepared] = {}
    keys: dict[tuple[str, str, bool], str] = {}
    for pool in pools:
        pending: dict[str, ray.ObjectRef] = {}
        for c in spec.candidates:
            for teacher in spec.space.teacher_backbone if pool else [None]:
                cfg = _preparation_config(spec, c, teacher, pool)
                blob = cfg.model_dump_json()  # candidates alike but for their name share one
                if not prepares(cfg):  # nothing to prepare: no worker to start for it
                    done[blob] = Prepared(cfg.model.backbone)
                elif blob not in done and blob not in pending:
                    pending[blob] = task.remote(blob, c.pretrained)
                keys[(c.name, teacher or "", pool)] = blob
        done |= dict(zip(pending, ray.get(list(pending.values())), strict=True))
    preparations = {key: done[blob] for key, blob in keys.items()}
    log.info("prepared: %s", {key: p.backbone for key, p in preparations.items()})
    return preparations


def preparation(preparations: Preparations, cfg: RunConfig, candidate: str) -> Prepared:
    """The preparation a trial of `candidate` with settings `cfg` fits from."""
    key = preparation_key(cfg, candidate)
    if key not in preparations:
        raise TransferDeskError(
            f"nothing was prepared for candidate {candidate} with teacher backbone {key[1] or 'its own'} "
            "(the search space changed since the search started?); run the search again under a new --name"
        )
    return preparations[key]
