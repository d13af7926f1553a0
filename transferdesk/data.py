"""Loading, checking, sampling and splitting labelled utterances (CSV, TSV, JSONL)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import random
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Literal

from transferdesk.config import DataConfig
from transferdesk.errors import TransferDeskError

log = logging.getLogger(__name__)

SAMPLE_PREFIX = "sample:"
SUPPORTED_SUFFIXES = (".csv", ".tsv", ".jsonl")
# An unlabelled pool may also be plain text, one message per line.
POOL_SUFFIXES = (*SUPPORTED_SUFFIXES, ".txt")
# A pool whose messages are mostly validation or test texts is a mistake (the wrong file),
# not a pool with some overlap to drop.
MAX_EVAL_OVERLAP = 0.5
# Shown per file before the rest are summarised as a count: enough to see the pattern.
MAX_PROBLEMS_SHOWN = 20


def sample_path(name: str) -> Path:
    """A file of the bundled sample data, e.g. sample_path("retail/train.csv")."""
    return Path(str(files("transferdesk") / "sample_data" / name))


def resolve_path(spec: str | Path, suffixes: tuple[str, ...] = SUPPORTED_SUFFIXES) -> Path:
    """A user path, or `sample:<task>/<split>.csv` for the bundled sample data."""
    spec = str(spec)
    path = sample_path(spec[len(SAMPLE_PREFIX) :]) if spec.startswith(SAMPLE_PREFIX) else Path(spec)
    if not path.is_file():
        hint = "" if path.parent.is_dir() else f" (directory {path.parent} does not exist either)"
        raise TransferDeskError(
            f"data file {spec} not found{hint}; check the path, or use sample:retail/train.csv "
            "for the bundled sample"
        )
    if path.suffix.lower() not in suffixes:
        raise TransferDeskError(
            f"{spec}: unsupported file type {path.suffix or '(none)'}; use one of {', '.join(suffixes)}"
        )
    return path


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


def _decode_lines(
    raw: bytes, name: str, problems: list[Problem], severity: Literal["error", "warning"] = "error"
) -> list[str]:
    lines = raw.split(b"\n")
    out = []
    for number, line in enumerate(lines, start=1):
        try:
            out.append(line.decode("utf-8"))
        except UnicodeDecodeError as err:
            hint = "save as UTF-8" if severity == "error" else "dropped; save as UTF-8 to keep it"
            problems.append(Problem(severity, name, number, f"undecodable bytes ({err.reason}); {hint}"))
            out.append(line.decode("utf-8", errors="replace"))
    if out and out[0].startswith("\ufeff"):
        out[0] = out[0][1:]
    return out


def _check_row(text: object, label: object, name: str, row: int, problems: list[Problem]) -> bool:
    if not isinstance(text, str):
        problems.append(Problem("error", name, row, f"utterance is not text: {text!r}"))
        return False
    if not text.strip():
        problems.append(Problem("error", name, row, "empty utterance"))
        return False
    if label is None or (isinstance(label, str) and not label.strip()):
        problems.append(Problem("error", name, row, "missing label"))
        return False
    if not isinstance(label, str | int):
        problems.append(Problem("error", name, row, f"label is not a string: {label!r}"))
        return False
    return True


def _missing_columns(name: str, wanted: list[str], found: list[str], hint: str) -> TransferDeskError:
    return TransferDeskError(
        f"{name}: missing column(s) {', '.join(wanted)}; the file has {', '.join(found) or 'none'}. "
        f"Rename them, or set {hint}"
    )


COLUMN_HINT = "data.text_column / data.label_column (--data.text_column NAME)"
Record = tuple  # (line number, value of each wanted column)


def _read_delimited(
    lines: list[str], delimiter: str, name: str, columns: tuple[str, ...], hint: str
) -> tuple[list[Record], list[Problem], set[str]]:
    reader = csv.DictReader(io.StringIO("\n".join(lines)), delimiter=delimiter)
    header = reader.fieldnames or []
    missing = [c for c in columns if c not in header]
    if missing:
        raise _missing_columns(name, missing, list(header), hint)
    records = [(reader.line_num, *(r.get(c) for c in columns)) for r in reader]
    return records, [], set(header)


def _read_jsonl(
    lines: list[str], name: str, columns: tuple[str, ...], hint: str
) -> tuple[list[Record], list[Problem], set[str]]:
    records, problems = [], []
    keys: set[str] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(Problem("error", name, number, f"not valid JSON: {err.msg}"))
            continue
        if not isinstance(obj, dict):
            problems.append(Problem("error", name, number, "each line must be a JSON object"))
            continue
        keys.update(obj)
        records.append((number, *(obj.get(c) for c in columns)))
    missing = [c for c in columns if c not in keys]
    if records and missing:
        raise _missing_columns(name, missing, sorted(keys), hint)
    return records, problems, keys


def _read_records(
    lines: list[str], suffix: str, name: str, columns: tuple[str, ...], hint: str = COLUMN_HINT
) -> tuple[list[Record], list[Problem], set[str]]:
    """Records of `columns`, problems, and the columns the file has."""
    if suffix == ".jsonl":
        return _read_jsonl(lines, name, columns, hint)
    if suffix == ".txt":
        return [(n, line) for n, line in enumerate(lines, start=1)], [], set()
    return _read_delimited(lines, "\t" if suffix == ".tsv" else ",", name, columns, hint)


def _task_label(value: object, name: str, row: int, task: str, problems: list[Problem]) -> str | None:
    """A task's label of one row: None when empty (the row does not train that task)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str | int) or isinstance(value, bool):
        problems.append(Problem("error", name, row, f"{task} label is not a string: {value!r}"))
        return None
    return str(value).strip()


def read_dataset(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    task_columns: dict[str, str] | None = None,
) -> tuple[Dataset, list[Problem]]:
    """Read a file; rows with problems are left out and reported, never silently dropped.
    `task_columns` (task → column): the labels of other tasks, from the columns the file has."""
    resolved = resolve_path(path)
    name = str(path)
    problems: list[Problem] = []
    lines = _decode_lines(resolved.read_bytes(), name, problems)
    suffix = resolved.suffix.lower()
    header = _read_records(lines, suffix, name, (), COLUMN_HINT)[2] if task_columns else set()
    tasks = {task: column for task, column in (task_columns or {}).items() if column in header}
    columns = (text_column, label_column, *tasks.values())
    records, more, _ = _read_records(lines, suffix, name, columns)
    problems += more
    texts, labels, rows = [], [], []
    task_labels: dict[str, list[str | None]] = {task: [] for task in tasks}
    for row, text, label, *others in records:
        if _check_row(text, label, name, row, problems):
            texts.append(str(text).strip())
            labels.append(str(label).strip())
            rows.append(row)
            for task, value in zip(tasks, others, strict=True):
                task_labels[task].append(_task_label(value, name, row, task, problems))
    if not texts:
        problems.append(Problem("error", name, None, "no usable rows"))
    return Dataset(texts, labels, rows, name, task_labels), problems


def normalise(text: str) -> str:
    """The form texts are compared in for overlap: case and runs of white space do not count."""
    return " ".join(text.casefold().split())


@dataclass
class Pool:
    """Unlabelled messages, checked: what is left after dropping what must not be learnt from."""

    texts: list[str]
    path: str
    sha256: str
    rows_read: int
    dropped: dict[str, int] = field(default_factory=dict)  # reason → rows

    def __len__(self) -> int:
        return len(self.texts)

    def summary(self, name: str) -> dict:
        """What a record says of the pool; `name`: how it names the file (a registry's portable
        name, never a machine path)."""
        return {
            "file": name,
            "sha256": self.sha256,
            "rows_read": self.rows_read,
            "rows_used": len(self),
            "dropped": self.dropped,
        }


def _pool_problem(problems: list[Problem], name: str, n: int, reason: str) -> None:
    if n:
        problems.append(Problem("warning", name, None, f"{reason}: {n} message{'s' * (n != 1)} dropped"))


def _reasons(dropped: Counter[str]) -> str:
    if not dropped:
        return "the file is empty"
    return ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in sorted(dropped.items()))


def load_pool(
    path: str, column: str, labelled: Dataset, evaluation: list[Dataset], max_rows: int, seed: int
) -> tuple[Pool, list[Problem]]:
    """Read and check an unlabelled pool. Empty and undecodable rows, duplicates, labelled
    training texts and, above all, any validation or test text are dropped (and reported), so
    a pool can never leak the evaluation data; a pool over `max_rows` is sampled (seeded)."""
    resolved = resolve_path(path, POOL_SUFFIXES)
    name, problems = str(path), []
    raw = resolved.read_bytes()
    lines = _decode_lines(raw, name, problems, severity="warning")
    bad_lines = {p.row for p in problems}
    hint = "data.unlabelled_column (--data.unlabelled_column NAME)"
    records, more, _ = _read_records(lines, resolved.suffix.lower(), name, (column,), hint)
    problems += more
    if resolved.suffix.lower() == ".txt" and records and not records[-1][1].strip():
        records.pop()  # the newline that ends the file
    dropped: Counter[str] = Counter()
    seen: set[str] = set()
    held_out = {normalise(t): ds.path for ds in evaluation for t in ds.texts}
    gold = {normalise(t) for t in labelled.texts}
    leaked: Counter[str] = Counter()
    texts = []
    for row, text in records:
        if row in bad_lines:
            dropped["undecodable"] += 1
        elif not isinstance(text, str) or not text.strip():
            dropped["empty"] += 1
        elif (key := normalise(text)) in held_out:
            dropped["evaluation_overlap"] += 1
            leaked[held_out[key]] += 1
        elif key in gold:
            dropped["labelled_overlap"] += 1
        elif key in seen:
            dropped["duplicate"] += 1
        else:
            seen.add(key)
            texts.append(text.strip())
    _pool_problem(problems, name, dropped["empty"], "empty or not text")
    _pool_problem(problems, name, dropped["duplicate"], "repeats of an earlier message")
    _pool_problem(problems, name, dropped["labelled_overlap"], "already labelled training texts")
    for other, n in sorted(leaked.items()):
        _pool_problem(
            problems, name, n, f"also in {other} (kept out: the pool must not leak evaluation data)"
        )
    usable = len(texts) + dropped["evaluation_overlap"]
    if usable and dropped["evaluation_overlap"] > MAX_EVAL_OVERLAP * usable:
        problems.append(
            Problem(
                "error",
                name,
                None,
                f"{dropped['evaluation_overlap']} of {usable} messages are validation or test texts: "
                "this looks like an evaluation file, not a pool of unlabelled traffic",
            )
        )
    elif not texts:
        problems.append(
            Problem(
                "error",
                name,
                None,
                f"no usable messages of {len(records)} rows ({_reasons(dropped)})",
            )
        )
    if len(texts) > max_rows:
        problems.append(
            Problem(
                "warning",
                name,
                None,
                f"{len(texts)} usable messages; a seeded sample of {max_rows} is used "
                "(raise data.unlabelled_max_rows to use more, at more training time)",
            )
        )
        dropped["over_max_rows"] = len(texts) - max_rows
        texts = [texts[i] for i in sorted(random.Random(seed).sample(range(len(texts)), max_rows))]
    digest = hashlib.sha256(raw).hexdigest()
    return Pool(texts, name, digest, len(records), dict(sorted(dropped.items()))), problems


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
    problems += _too_small(cleaned, ds.path, min_per_intent)
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
    problems += _too_small(combined, extra.path, 2)
    # A misspelt or differently named out-of-scope label would otherwise train as an intent.
    problems += [
        Problem("warning", extra.path, None, f"{n} rows of {intent!r}, an intent the training file lacks")
        for intent, n in sorted(extra.subset(keep).counts().items())
        if intent not in train.counts()
    ]
    return combined, problems


def _too_small(ds: Dataset, path: str, least: int) -> list[Problem]:
    return [
        Problem("error", path, None, f"intent {intent!r} has {n} example; each intent needs at least {least}")
        for intent, n in sorted(ds.counts().items())
        if n < least
    ]


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
