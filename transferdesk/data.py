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
    texts: list[str]
    labels: list[str]
    rows: list[int] = field(default_factory=list)  # line in the file, for messages
    path: str = "<memory>"

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
        )

    def plus(self, other: Dataset) -> Dataset:
        """This data and then `other`'s rows (their line numbers are their own file's)."""
        return Dataset(
            self.texts + other.texts, self.labels + other.labels, self.rows + other.rows, self.path
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
) -> tuple[list[Record], list[Problem]]:
    reader = csv.DictReader(io.StringIO("\n".join(lines)), delimiter=delimiter)
    header = reader.fieldnames or []
    missing = [c for c in columns if c not in header]
    if missing:
        raise _missing_columns(name, missing, list(header), hint)
    records = [(reader.line_num, *(r.get(c) for c in columns)) for r in reader]
    return records, []


def _read_jsonl(
    lines: list[str], name: str, columns: tuple[str, ...], hint: str
) -> tuple[list[Record], list[Problem]]:
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
    return records, problems


def _read_records(
    lines: list[str], suffix: str, name: str, columns: tuple[str, ...], hint: str = COLUMN_HINT
) -> tuple[list[Record], list[Problem]]:
    if suffix == ".jsonl":
        return _read_jsonl(lines, name, columns, hint)
    if suffix == ".txt":
        return [(n, line) for n, line in enumerate(lines, start=1)], []
    return _read_delimited(lines, "\t" if suffix == ".tsv" else ",", name, columns, hint)


def read_dataset(
    path: str | Path, text_column: str = "text", label_column: str = "label"
) -> tuple[Dataset, list[Problem]]:
    """Read a file; rows with problems are left out and reported, never silently dropped."""
    resolved = resolve_path(path)
    name = str(path)
    problems: list[Problem] = []
    lines = _decode_lines(resolved.read_bytes(), name, problems)
    records, more = _read_records(lines, resolved.suffix.lower(), name, (text_column, label_column))
    problems += more
    texts, labels, rows = [], [], []
    for row, text, label in records:
        if _check_row(text, label, name, row, problems):
            texts.append(str(text).strip())
            labels.append(str(label).strip())
            rows.append(row)
    if not texts:
        problems.append(Problem("error", name, None, "no usable rows"))
    return Dataset(texts, labels, rows, name), problems


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

    def summary(self) -> dict:
        return {
            "file": self.path,
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
    records, more = _read_records(lines, resolved.suffix.lower(), name, (column,), hint)
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
    ds: Dataset, oos_label: str, min_per_intent: int = 2
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
    if oos_label in cleaned.labels:
        problems.append(
            Problem(
                "warning",
                ds.path,
                None,
                f"{cleaned.counts()[oos_label]} out-of-scope ('{oos_label}') rows are not "
                "trained on as an intent; out-of-scope is detected by confidence",
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


def summarize(ds: Dataset, oos_label: str = "oos") -> dict:
    chars = [len(t) for t in ds.texts] or [0]
    words = [len(t.split()) for t in ds.texts] or [0]
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
        "chars": stats(chars),
        "words": stats(words),
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

    @property
    def intents(self) -> list[str]:
        return self.train.intents


def _read_checked(path: str, cfg: DataConfig) -> tuple[Dataset, list[Problem]]:
    return read_dataset(path, cfg.text_column, cfg.label_column)


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
    for path in cfg.extra_train:
        raw_extra, found = _read_checked(path, cfg)
        problems += found
        train, found = _with_extra(train, raw_extra, cfg.oos_label, evaluation)
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
    return Splits(train, valid, test, source, pool)
