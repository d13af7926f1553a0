"""Source stages of the candidates: trained once each, as Ray tasks, before any trial (a
candidate with joint transfer has none: its trials train the source task themselves).

Candidates that share backbone, source data and source settings share one checkpoint
(the cache key of transferdesk.training.train.source_key), and a checkpoint already in the
registry's sources/ directory is reused across searches once its manifest checks out.
"""

from __future__ import annotations

import logging

import ray

from transferdesk.config import RunConfig
from transferdesk.data import check_training_data, raise_on_errors, read_dataset
from transferdesk.training.train import source_key, source_stage
from transferdesk.training.trainer import configure_runtime
from tuning.config import Candidate, TuneSpec

log = logging.getLogger(__name__)


def source_config(spec: TuneSpec, candidate: Candidate) -> RunConfig:
    base = spec.base_run()
    stage = base.source_training.model_copy(
        update={
            "objective": candidate.objective,
            "epochs": candidate.source_epochs or base.source_training.epochs,
            "mode": candidate.transfer,
        }
    )
    return base.model_copy(
        update={
            "model": base.model.model_copy(update={"backbone": candidate.backbone}),
            "data": base.data.model_copy(update={"source": candidate.source}),
            "source_training": stage,
        }
    )


@ray.remote
def _train_source(cfg_json: str) -> str:
    cfg = RunConfig.model_validate_json(cfg_json)
    device = configure_runtime(cfg.runtime)
    raw, problems = read_dataset(cfg.data.source, cfg.data.text_column, cfg.data.label_column)
    source, more = check_training_data(raw, cfg.data.oos_label)
    raise_on_errors(problems + more)
    return str(source_stage(cfg, source, device))


def prepare_backbones(spec: TuneSpec) -> dict[str, str]:
    """Candidate name → the backbone its trials start from (a source checkpoint or as given)."""
    backbones = {c.name: c.backbone for c in spec.candidates if not c.source_stage}
    pending: dict[str, tuple[ray.ObjectRef, list[str]]] = {}
    for candidate in (c for c in spec.candidates if c.source_stage):
        cfg = source_config(spec, candidate)
        key = source_key(cfg)
        if key not in pending:
            task = _train_source.options(
                num_cpus=spec.search.cpus_per_trial, num_gpus=spec.search.gpus_per_trial
            )
            pending[key] = (task.remote(cfg.model_dump_json()), [])
        pending[key][1].append(candidate.name)
    for key, (ref, names) in pending.items():
        path = ray.get(ref)
        log.info("source checkpoint %s ready for %s", key, ", ".join(names))
        backbones.update(dict.fromkeys(names, path))
    return backbones
