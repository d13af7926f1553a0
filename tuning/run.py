"""Run a search: check everything, connect to Ray, train source stages once, search with
Optuna (or random) + ASHA, then export the best checkpoint into the registry."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import ray
from ray import tune

from transferdesk.data import SAMPLE_PREFIX, load_splits, resolve_path, with_sample_defaults
from transferdesk.errors import TransferDeskError
from transferdesk.model.modeling import IntentModel
from transferdesk.model.network import resolve_backbone
from transferdesk.registry import ModelVersion, Registry, portable_config
from transferdesk.training.chain import load_run
from transferdesk.training.train import finish, pool_record, publish
from transferdesk.training.validation import resolve_monitor
from tuning.config import TuneSpec
from tuning.prepare import Preparations, preparation, prepare_candidates
from tuning.report import plot_curves, trial_rows, write_table
from tuning.schedule import BaselineExemptASHA
from tuning.space import baseline_points, param_space, trial_config
from tuning.trainable import run_trial

log = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 5
# Keeping one checkpoint per trial (CheckpointConfig(num_to_keep=1)) makes Tune snapshot its
# state at every improvement and warn about it; the state is small, the warning is noise.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def _absolute(path: str | None) -> str | None:
    """Trials run in other working directories (and on other nodes): no relative paths."""
    if path is None or path.startswith(SAMPLE_PREFIX) or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def _absolute_backbone(name: str) -> str:
    return str(Path(name).resolve()) if Path(name).expanduser().is_dir() else name


def prepare_spec(spec: TuneSpec) -> TuneSpec:
    """Fill sample defaults, make paths absolute, and check every file and backbone exists."""
    data = with_sample_defaults(spec.run.data)
    data = data.model_copy(
        update={k: _absolute(getattr(data, k)) for k in ("train", "valid", "test", "source", "unlabelled")}
        | {"extra_train": [_absolute(path) for path in data.extra_train]}
        | {"tasks": {t: s.model_copy(update={"train": _absolute(s.train)}) for t, s in data.tasks.items()}}
    )
    candidates = [
        c.model_copy(update={"source": _absolute(c.source), "backbone": _absolute_backbone(c.backbone)})
        for c in spec.candidates
    ]
    # The run's own teacher too, so that the baseline trials find it among the choices.
    own_teacher = spec.run.semi_supervised.teacher_backbone
    semi = spec.run.semi_supervised.model_copy(
        update={"teacher_backbone": own_teacher and _absolute_backbone(own_teacher)}
    )
    run = spec.run.model_copy(
        update={"data": data, "output": _absolute(spec.run.output), "semi_supervised": semi}
    )
    teachers = [name and _absolute_backbone(name) for name in spec.space.teacher_backbone]
    space = spec.space.model_copy(update={"teacher_backbone": teachers})
    spec = spec.model_copy(update={"run": run, "candidates": candidates, "space": space})
    own = [task.train for task in data.tasks.values()]
    for path in (data.train, *data.extra_train, *own, data.valid, data.test, *(c.source for c in candidates)):
        if path:
            resolve_path(path)  # raises a clear error for a missing or unsupported file
    for backbone in (*(c.backbone for c in candidates), *filter(None, teachers)):
        resolve_backbone(backbone)
    # Every data problem up front (the pool's too, which is checked against the test file).
    splits = load_splits(data, spec.run.runtime.seed)
    # Tune needs one metric name for every trial: resolved here, from the validation file.
    # auto is the run's training.monitor, so that checkpoints are picked as epochs are.
    metric = spec.run.training.monitor if spec.search.metric == "auto" else spec.search.metric
    metric = resolve_monitor(metric, data.oos_label in splits.valid.labels)
    search = spec.search.model_copy(
        update={"storage_path": _absolute(spec.search.storage_path), "metric": metric}
    )
    return spec.model_copy(update={"search": search})


def _check_reachable(address: str) -> None:
    """Fail in seconds, not after Ray's minutes of reconnect attempts, when nothing listens."""
    if address in ("auto", "local"):
        return
    host, _, port = address.split("://")[-1].rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as err:
        raise TransferDeskError(
            f"cannot reach the Ray cluster at {address} ({err}); check the address "
            "(ray://host:10001 or host:6379) and that the cluster is up, or unset it to start "
            "a local Ray"
        ) from None


def connect(address: str | None, spec: TuneSpec) -> None:
    """Start a local Ray, or join the cluster at `address` / RAY_ADDRESS; check its resources."""
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            _check_reachable(address)
        try:
            ray.init(
                address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING
            )
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise TransferDeskError(
                f"cannot reach the Ray cluster at {address}: {err}. Check the address "
                "(ray://host:10001 or host:6379) or unset it to start a local Ray"
            ) from None
    available = ray.cluster_resources()
    for resource, wanted in (("CPU", spec.search.cpus_per_trial), ("GPU", spec.search.gpus_per_trial)):
        if wanted > available.get(resource, 0):
            raise TransferDeskError(
                f"each trial asks for {wanted:g} {resource} but the cluster has "
                f"{available.get(resource, 0):g}; lower search.{resource.lower()}s_per_trial "
                "or add nodes"
            )


def experiment_path(spec: TuneSpec) -> str:
    return f"{spec.search.storage_path.rstrip('/')}/{spec.run.name}"


Resume = bool | Literal["auto"]  # "auto": resume when the search exists, else start it


def build_tuner(spec: TuneSpec, preparations: Preparations, resume: Resume) -> tune.Tuner:
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, spec_json=spec.model_dump_json(), preparations=preparations),
        {"cpu": spec.search.cpus_per_trial, "gpu": spec.search.gpus_per_trial},
    )
    path = experiment_path(spec)
    if resume == "auto":  # a retried Ray Job: continue the search its first attempt started
        resume = tune.Tuner.can_restore(path)
    if resume:
        if not tune.Tuner.can_restore(path):
            raise TransferDeskError(f"nothing to resume at {path}; run without --resume to start")
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    if tune.Tuner.can_restore(path):
        raise TransferDeskError(
            f"a search named {spec.run.name!r} already exists at {path}; continue it with --resume, "
            "or set another name (--name)"
        )
    metric = spec.search.metric
    points = baseline_points(spec) if spec.search.baseline else None
    if spec.search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(metric=metric, mode="max", seed=spec.search.seed, points_to_evaluate=points)
        limit = spec.search.max_concurrent  # Tune wraps a Searcher in a ConcurrencyLimiter
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        search_alg = BasicVariantGenerator(
            points_to_evaluate=points,
            random_state=spec.search.seed,
            max_concurrent=spec.search.max_concurrent or 0,
        )
        limit = None  # a generator limits itself
    scheduler = BaselineExemptASHA(
        points or [],
        time_attr="training_iteration",
        max_t=spec.space.epochs[1],
        grace_period=spec.search.grace_period,
        reduction_factor=spec.search.reduction_factor,
    )
    return tune.Tuner(
        trainable,
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            metric=metric,
            mode="max",
            search_alg=search_alg,
            scheduler=scheduler,
            num_samples=spec.search.num_samples,
            max_concurrent_trials=limit,
            time_budget_s=spec.search.time_budget_s,
            # A trial's process imports torch and transformers; reusing it saves seconds a trial.
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=spec.run.name,
            storage_path=spec.search.storage_path,
            failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=1,
        ),
    )


def search(spec: TuneSpec, address: str | None = None, resume: Resume = False) -> SearchResult:
    """Everything before export. Trials read training and validation data only (with a pool,
    the teachers' tasks read the test file too, to keep its texts out of the pool)."""
    connect(address, spec)
    preparations = prepare_candidates(spec)
    started = time.monotonic()
    results = build_tuner(spec, preparations, resume).fit()
    finished = results.num_terminated + results.num_errors
    budget = spec.search.time_budget_s
    out_of_time = budget is not None and time.monotonic() - started >= budget
    if finished < spec.search.num_samples and not out_of_time:  # Ctrl-C: Tune saved its state
        raise TransferDeskError(
            f"search interrupted after {finished} of {spec.search.num_samples} trials; its state is "
            f"in {experiment_path(spec)}: run the same command with --resume to continue"
        )
    if not any(r.checkpoint for r in results):
        errors = "; ".join(str(e).splitlines()[-1] for e in results.errors[:3])
        raise TransferDeskError(f"no trial finished an epoch, nothing to export ({errors})")
    return SearchResult(results, preparations)


@dataclass
class SearchResult:
    results: tune.ResultGrid
    preparations: Preparations  # what each candidate's trials fitted from (tuning.prepare)


def experiment_id(spec: TuneSpec) -> str:
    """How an exported version names its search without a machine path (see the registry):
    the search's name and a digest of where its state is, unique to it."""
    digest = hashlib.sha256(experiment_path(spec).encode()).hexdigest()[:12]
    return f"{spec.run.name}-{digest}"


def recorded_spec(spec: TuneSpec, registry: Registry) -> TuneSpec:
    """The search as the exported version records it (search/search.yaml), paths portable."""
    candidates = [
        c.model_copy(
            update={"source": registry.portable(c.source), "backbone": registry.portable(c.backbone)}
        )
        for c in spec.candidates
    ]
    search = spec.search.model_copy(update={"storage_path": registry.portable(spec.search.storage_path)})
    run = portable_config(spec.run, registry.root)
    teachers = [registry.portable(name) for name in spec.space.teacher_backbone]
    space = spec.space.model_copy(update={"teacher_backbone": teachers})
    return spec.model_copy(update={"run": run, "candidates": candidates, "search": search, "space": space})


def load_checkpoint(checkpoint: Path) -> IntentModel:
    try:
        return IntentModel.load(checkpoint)
    except FileNotFoundError as err:
        raise TransferDeskError(
            f"the best trial's checkpoint {checkpoint} lacks {Path(err.filename).name}: it was saved by "
            "an older TransferDesk. Run the search again under a new name (--name) instead of resuming it"
        ) from None


def export(spec: TuneSpec, found: SearchResult) -> ModelVersion:
    """The best checkpoint, calibrated and scored once on the test file, as a new registry version."""
    metric, results = spec.search.metric, found.results
    best = max((r for r in results if r.checkpoint), key=lambda r: r.metrics_dataframe[metric].max())
    rows = trial_rows(results, metric, baseline_points(spec) if spec.search.baseline else [])
    candidate = spec.candidate(best.config["candidate"])
    # The recipe as configured (the candidate's backbone and source, the test file), not the
    # trial's prepared encoder; the threshold is chosen on validation data as in train.
    trial = trial_config(spec, best.config)
    cfg = trial.model_copy(update={"data": trial.data.model_copy(update={"test": spec.run.data.test})})
    prepared = preparation(found.preparations, cfg, candidate.name)
    registry = Registry(spec.run.output)
    with registry.draft(spec.run.name) as draft, best.checkpoint.as_directory() as checkpoint:
        model = load_checkpoint(Path(checkpoint))
        run = load_run(cfg, candidate.pretrained, data=cfg.data.model_copy(update={"source": None}))
        run.prepared = prepared
        calibration = finish(model, run.splits, cfg)
        search_dir = draft.search_dir
        write_table(rows, search_dir)
        plot_curves(results, metric, search_dir / "curves.png")
        (search_dir / "search.yaml").write_text(recorded_spec(spec, registry).to_yaml())
        metrics = {
            "search": {
                "best_config": best.config
                | {"teacher_backbone": registry.portable(best.config.get("teacher_backbone"))},
                f"best_valid_{metric}": rows[0][f"best_{metric}"],
                "trials": len(rows),
                "experiment": experiment_id(spec),
            },
            "calibration": calibration,
        }
        if prepared.teachers:
            metrics["semi_supervised"] = pool_record(run, [])
        return publish(
            draft,
            model,
            cfg,
            run.splits,
            metrics,
            timings={"train_seconds": float(best.metrics_dataframe["time_total_s"].iloc[-1])},
            device="cuda" if spec.search.gpus_per_trial else "cpu",  # where the trials trained
            source_checkpoint=prepared.source_checkpoint,
            candidate=candidate.name,
            pretrained=candidate.pretrained,
        )


def exported_version(spec: TuneSpec) -> ModelVersion | None:
    """The registry version this search already exported, if any."""
    if not Path(spec.run.output, spec.run.name).is_dir():
        return None
    for version in reversed(Registry(spec.run.output).versions(spec.run.name)):
        # Versions exported before experiment ids recorded the experiment's path itself.
        if version.metrics.get("search", {}).get("experiment") in (
            experiment_id(spec),
            experiment_path(spec),
        ):
            return version
    return None


def tune_and_export(spec: TuneSpec, address: str | None = None, resume: Resume = False) -> ModelVersion:
    spec = prepare_spec(spec)
    # A Ray Job retried after its export (driver lost at the very end) must not export twice.
    if resume and tune.Tuner.can_restore(experiment_path(spec)) and (done := exported_version(spec)):
        log.info("search %s was already exported as %s", experiment_path(spec), done.path)
        return done
    version = export(spec, search(spec, address, resume))
    log.info("search state in %s; trial table in %s", experiment_path(spec), version.search_dir / "trials.md")
    return version
