"""A labelled dataset, its checks, few-shot sampling and stratified splits."""

from __future__ import annotations

import logging
import random
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Literal

from transferdesk.errors import TransferDeskError

log = logging.getLogger(__name__)

# Shown per file before the rest are summarised as a count: enough to see the pattern.
MAX_PROBLEMS_SHOWN = 20


@dataclass(frozen=True)
class Problem:
    severity: Literal["error", "warning"]
    file: str
    row: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.row}" if self.row is not None else self.file
        return f"{where}: {self.severity}: {self.message}"


@dataclass
class Dataset:
    """Labelled messages: the intent of each (`labels`), and the labels of other tasks where
    the file has their columns (`tasks`: task → label per row, None where the row has none)."""

    texts: list[str]
    labels: list[str]
    rows: list[int] = field(default_factory=list)  # line in the file, for messages
    path: str = "<memory>"
    tasks: dict[str, list[str | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.rows:
            self.rows = list(range(1, len(self.texts) + 1))

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def intents(self) -> list[str]:
        return sorted(set(self.labels))

    def counts(self) -> Counter[str]:
        return Counter(self.labels)

    def subset(self, indices: list[int]) -> Dataset:
        return Dataset(
            [self.texts[i] for i in indices],
            [self.labels[i] for i in indices],
            [self.rows[i] for i in indices],
            self.path,
            {task: [labels[i] for i in indices] for task, labels in self.tasks.items()},
        )

    def plus(self, other: Dataset) -> Dataset:
        """This data and then `other`'s rows (their line numbers are their own file's); a task
        only one of them has is unlabelled on the other's rows."""
        tasks = {
            task: self.tasks.get(task, [None] * len(self)) + other.tasks.get(task, [None] * len(other))
            for task in {**self.tasks, **other.tasks}
        }
        return Dataset(
            self.texts + other.texts, self.labels + other.labels, self.rows + other.rows, self.path, tasks
        )

    def task(self, name: str) -> Dataset:
        """The rows labelled for task `name`, with its labels as theirs."""
        labels = self.tasks.get(name, [])
        keep = [i for i, label in enumerate(labels) if label is not None]
        return Dataset(
            [self.texts[i] for i in keep], [labels[i] for i in keep], [self.rows[i] for i in keep], self.path
        )

    def without(self, label: str) -> Dataset:
        return self.subset([i for i, lab in enumerate(self.labels) if lab != label])


def check_training_data(
    ds: Dataset, oos_label: str | None, min_per_intent: int = 2
) -> tuple[Dataset, list[Problem]]:
    """Duplicates are dropped (warning); conflicting labels and tiny intents are errors."""
    problems: list[Problem] = []
    first_seen: dict[str, int] = {}
    labels_of: dict[str, set[str]] = defaultdict(set)
    keep = []
    for i, (text, label) in enumerate(zip(ds.texts, ds.labels, strict=True)):
        labels_of[text].add(label)
        if text in first_seen and ds.labels[first_seen[text]] == label:
            problems.append(
                Problem(
                    "warning",
                    ds.path,
                    ds.rows[i],
                    f"exact duplicate of row {ds.rows[first_seen[text]]}; dropped",
                )
            )
            continue
        first_seen.setdefault(text, i)
        keep.append(i)
    for text, labels in labels_of.items():
        if len(labels) > 1:
            problems.append(
                Problem(
                    "error",
                    ds.path,
                    ds.rows[first_seen[text]],
                    f"the same text has labels {', '.join(sorted(labels))}: {text[:60]!r}; keep one label",
                )
            )
    cleaned = ds.subset(keep)
    if oos_label is not None and oos_label in cleaned.labels:
        problems.append(
            Problem(
                "warning",
                ds.path,
                None,
                f"{cleaned.counts()[oos_label]} out-of-scope ('{oos_label}') rows are not an "
                "intent; training.outlier_weight above 0 teaches the model to doubt them",
            )
        )
        cleaned = cleaned.without(oos_label)
    problems += too_small(cleaned, ds.path, min_per_intent)
    return cleaned, problems


def check_eval_data(ds: Dataset, known: list[str], oos_label: str) -> list[Problem]:
    unseen = sorted(set(ds.labels) - set(known) - {oos_label})
    if not unseen:
        return []
    n = sum(lab in unseen for lab in ds.labels)
    return [
        Problem(
            "warning",
            ds.path,
            None,
            f"{n} rows have labels training never saw ({', '.join(unseen[:10])}"
            f"{', …' if len(unseen) > 10 else ''}); they can only be predicted wrong",
        )
    ]


def few_shot(ds: Dataset, k: int, seed: int) -> Dataset:
    """k examples per intent (all of them when an intent has fewer), seeded."""
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(ds.labels):
        by_label[label].append(i)
    picked = []
    for label in sorted(by_label):
        idx = by_label[label]
        picked += sorted(rng.sample(idx, min(k, len(idx))))
    return ds.subset(sorted(picked))


def stratified_split(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Hold out `fraction` of each intent (at least one row, never its last one)."""
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(ds.labels):
        by_label[label].append(i)
    train_idx, valid_idx = [], []
    for label in sorted(by_label):
        idx = by_label[label][:]
        rng.shuffle(idx)
        n_valid = min(len(idx) - 1, max(1, round(len(idx) * fraction)))
        valid_idx += idx[:n_valid]
        train_idx += idx[n_valid:]
    return ds.subset(sorted(train_idx)), ds.subset(sorted(valid_idx))


# Words are counted only where most messages have spaces between them: Chinese or Japanese
# text has none, and its "words" would be whole messages.
SPACED_SHARE = 0.5


def summarize(ds: Dataset, oos_label: str = "oos", tokenizer: object | None = None) -> dict:
    """Rows, intents, examples per intent, each task's classes, and lengths: in characters, in
    tokens of `tokenizer` (what max_length cuts), and in words for text written with spaces."""
    chars = [len(t) for t in ds.texts] or [0]
    spaced = sum(len(t.split()) > 1 for t in ds.texts) >= SPACED_SHARE * max(len(ds), 1)
    counts = ds.counts()
    in_scope = {k: v for k, v in counts.items() if k != oos_label}

    def stats(xs: list[int]) -> dict:
        ordered = sorted(xs)
        return {
            "min": ordered[0],
            "mean": round(statistics.fmean(ordered), 1),
            "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
            "max": ordered[-1],
        }

    return {
        "file": ds.path,
        "rows": len(ds),
        "intents": len(in_scope),
        "out_of_scope_rows": counts.get(oos_label, 0),
        "examples_per_intent": dict(sorted(in_scope.items())),
        "tasks": {task: dict(sorted(ds.task(task).counts().items())) for task in ds.tasks},
        "chars": stats(chars),
        **(
            {"tokens": stats([len(ids) for ids in tokenizer(ds.texts)["input_ids"]] or [0])}
            if tokenizer
            else {}
        ),
        **({"words": stats([len(t.split()) for t in ds.texts] or [0])} if spaced else {}),
    }


def raise_on_errors(problems: list[Problem]) -> None:
    """Log warnings; refuse to go on when any problem is an error."""
    errors = [p for p in problems if p.severity == "error"]
    warnings = [p for p in problems if p.severity == "warning"]
    for p in warnings[:MAX_PROBLEMS_SHOWN]:
        log.warning("%s", p)
    if len(warnings) > MAX_PROBLEMS_SHOWN:
        log.warning(
            "… and %d more warnings (`transferdesk data check FILE` lists them all)",
            len(warnings) - MAX_PROBLEMS_SHOWN,
        )
    if errors:
        shown = "\n".join(f"  {p}" for p in errors[:MAX_PROBLEMS_SHOWN])
        more = len(errors) - MAX_PROBLEMS_SHOWN
        extra = f"\n  … and {more} more" if more > 0 else ""
        raise TransferDeskError(
            f"the data has {len(errors)} problem(s) that stop training:\n{shown}{extra}\n"
            "Fix these rows (see `transferdesk data check FILE`) and run again."
        )


def too_small(ds: Dataset, path: str, least: int) -> list[Problem]:
    return [
        Problem("error", path, None, f"intent {intent!r} has {n} example; each intent needs at least {least}")
        for intent, n in sorted(ds.counts().items())
        if n < least
    ]
