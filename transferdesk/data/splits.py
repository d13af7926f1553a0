"""A run's data: training, validation, test, source, task and pool files, loaded and checked."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from transferdesk.config import DataConfig
from transferdesk.data.dataset import (
    Dataset,
    Problem,
    check_eval_data,
    check_training_data,
    few_shot,
    raise_on_errors,
    stratified_split,
    too_small,
)
from transferdesk.data.files import SAMPLE_PREFIX, read_dataset
from transferdesk.data.pool import Pool, load_pool
from transferdesk.errors import TransferDeskError

log = logging.getLogger(__name__)


@dataclass
class Splits:
    train: Dataset
    valid: Dataset
    test: Dataset | None
    source: Dataset | None
    pool: Pool | None = None
    # Tasks with a training file of their own: task → (train, valid), the task's labels as labels.
    own: dict[str, tuple[Dataset, Dataset]] = field(default_factory=dict)
    # The training files' out-of-scope messages (outlier exposure; none of validation or test).
    outliers: list[str] = field(default_factory=list)

    @property
    def intents(self) -> list[str]:
        return self.train.intents

    def task_labels(self) -> dict[str, list[str]]:
        """Each task's classes (its head's outputs, in order), from all its training rows."""
        found = {task: self.train.task(task).labels for task in self.train.tasks if task not in self.own}
        # A task with a file of its own learns from that file alone (a same-named column of the
        # training file would add classes its head never trains on).
        found |= {task: train.labels for task, (train, _) in self.own.items()}
        return {task: sorted(set(labels)) for task, labels in found.items()}


def _read_checked(path: str, cfg: DataConfig) -> tuple[Dataset, list[Problem]]:
    return read_dataset(path, cfg.text_column, cfg.label_column, cfg.task_columns())


def check_tasks(ds: Dataset, cfg: DataConfig) -> list[Problem]:
    """Each task trained from this file's column: the column is there, and each of its classes
    has two rows at least (rows without a label are fine: they do not train that head)."""
    problems = []
    for task, settings in cfg.tasks.items():
        if settings.train is not None:
            continue
        column = settings.label_column(task)
        if task not in ds.tasks:
            problems.append(
                Problem(
                    "error",
                    ds.path,
                    None,
                    f"no column {column!r} for task {task!r}; add it, or set data.tasks.{task}.column "
                    f"(or .train, a file of its own)",
                )
            )
            continue
        problems += _task_classes(ds.task(task), task, ds.path)
    return problems


def _task_classes(ds: Dataset, task: str, path: str) -> list[Problem]:
    if len(ds.intents) < 2:
        found = ", ".join(ds.intents) or "none"
        return [Problem("error", path, None, f"task {task!r} needs two classes at least; found {found}")]
    return [
        Problem("error", path, None, f"{task} class {label!r} has {n} example; each needs at least 2")
        for label, n in sorted(ds.counts().items())
        if n < 2
    ]


def _own_task_data(
    task: str, path: str, column: str, cfg: DataConfig, evaluation: set[str], seed: int
) -> tuple[tuple[Dataset, Dataset], list[Problem]]:
    """A task's own training file, checked (duplicates, conflicts, classes; no validation or
    test text), and split for validation."""
    raw, problems = read_dataset(path, cfg.text_column, column)
    # No label of a task is out-of-scope: nothing is set aside here.
    ds, found = check_training_data(raw, oos_label=None, min_per_intent=2)
    keep = [i for i, text in enumerate(ds.texts) if text not in evaluation]
    if dropped := len(ds) - len(keep):
        problems.append(Problem("warning", path, None, f"{dropped} validation or test texts; dropped"))
    ds = ds.subset(keep)
    problems += found + _task_classes(ds, task, path)
    return stratified_split(ds, cfg.valid_fraction, seed), problems


def _with_extra(
    train: Dataset, raw: Dataset, oos_label: str, evaluation: set[str]
) -> tuple[Dataset, list[Problem]]:
    """Training data plus an extra file's rows. The extra file is checked on its own, but for
    its intents' sizes (a few reviewed messages of an intent are enough: the intent is counted
    with the training data's). Its texts already in the training data are dropped, and one
    labelled otherwise there is an error; its texts of the validation or test data are dropped,
    so that they are not learnt and then scored."""
    extra, problems = check_training_data(raw, oos_label, min_per_intent=1)
    labelled = dict(zip(train.texts, train.labels, strict=True))
    keep = []
    for i, (text, label) in enumerate(zip(extra.texts, extra.labels, strict=True)):
        if text in evaluation:
            problems.append(Problem("warning", extra.path, extra.rows[i], "validation or test text; dropped"))
        elif text not in labelled:
            keep.append(i)
        elif labelled[text] != label:
            problems.append(
                Problem(
                    "error",
                    extra.path,
                    extra.rows[i],
                    f"labelled {label!r} here, {labelled[text]!r} in {train.path}: {text[:60]!r}; keep one",
                )
            )
        else:
            problems.append(
                Problem("warning", extra.path, extra.rows[i], f"already in {train.path}; dropped")
            )
    combined = train.plus(extra.subset(keep))
    problems += too_small(combined, extra.path, 2)
    # A misspelt or differently named out-of-scope label would otherwise train as an intent.
    problems += [
        Problem("warning", extra.path, None, f"{n} rows of {intent!r}, an intent the training file lacks")
        for intent, n in sorted(extra.subset(keep).counts().items())
        if intent not in train.counts()
    ]
    return combined, problems


def with_sample_defaults(cfg: DataConfig) -> DataConfig:
    """No training file given: the bundled Northwind Market sample, all three splits."""
    if cfg.train is not None:
        return cfg
    return cfg.model_copy(
        update={
            "train": f"{SAMPLE_PREFIX}retail/train.csv",
            "valid": cfg.valid or f"{SAMPLE_PREFIX}retail/valid.csv",
            "test": cfg.test or f"{SAMPLE_PREFIX}retail/test.csv",
        }
    )


def load_splits(cfg: DataConfig, seed: int) -> Splits:
    """Read and check every file of a run before any training starts (the pool too, so a bad
    pool fails in seconds rather than after the teachers have trained)."""
    if cfg.train is None:
        raise TransferDeskError("no training file: set data.train (--train FILE)")
    problems: list[Problem] = []
    raw, found = _read_checked(cfg.train, cfg)
    problems += found
    train, found = check_training_data(raw, cfg.oos_label)
    problems += found
    if not train.intents:  # nothing to train: stop before the few-shot sample and the split
        problems.append(Problem("error", cfg.train, None, "no intent to train on: every row is out-of-scope"))
        raise_on_errors(problems)
    if cfg.valid:
        valid, found = _read_checked(cfg.valid, cfg)
        problems += found + check_eval_data(valid, train.intents, cfg.oos_label)
    else:
        train, valid = stratified_split(train, cfg.valid_fraction, seed)
    if cfg.few_shot_k:
        train = few_shot(train, cfg.few_shot_k, seed)
    test = None
    if cfg.test:
        test, found = _read_checked(cfg.test, cfg)
        problems += found + check_eval_data(test, train.intents, cfg.oos_label)
    evaluation = {text for ds in (valid, test) if ds is not None for text in ds.texts}
    outliers = out_of_scope_texts(raw, cfg.oos_label, evaluation)
    for path in cfg.extra_train:
        raw_extra, found = _read_checked(path, cfg)
        problems += found
        train, found = _with_extra(train, raw_extra, cfg.oos_label, evaluation)
        problems += found
        outliers += out_of_scope_texts(raw_extra, cfg.oos_label, evaluation | set(outliers))
    problems += check_tasks(train, cfg)
    own = {}
    for task, settings in cfg.tasks.items():
        if settings.train is not None:
            column = settings.label_column(task)
            own[task], found = _own_task_data(task, settings.train, column, cfg, evaluation, seed)
            problems += found
    source = None
    if cfg.source:
        raw_source, found = _read_checked(cfg.source, cfg)
        problems += found
        source, found = check_training_data(raw_source, cfg.oos_label)
        problems += found
    pool = None
    if cfg.unlabelled:
        column = cfg.unlabelled_column or cfg.text_column
        evaluation = [ds for ds in (valid, test) if ds is not None]
        pool, found = load_pool(cfg.unlabelled, column, train, evaluation, cfg.unlabelled_max_rows, seed)
        problems += found
    raise_on_errors(problems)
    return Splits(train, valid, test, source, pool, own, outliers)


def out_of_scope_texts(ds: Dataset, oos_label: str, evaluation: set[str]) -> list[str]:
    """The out-of-scope rows' texts, once each, but for validation or test texts (a model
    trained to doubt them would be scored on them)."""
    found = [text for text, label in zip(ds.texts, ds.labels, strict=True) if label == oos_label]
    return [text for text in dict.fromkeys(found) if text not in evaluation]
