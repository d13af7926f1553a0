"""Reading labelled utterances from CSV, TSV and JSONL files, and the bundled sample data."""

from __future__ import annotations

import csv
import io
import json
import logging
from importlib.resources import files
from pathlib import Path
from typing import Literal

from transferdesk.data.dataset import Dataset, Problem
from transferdesk.errors import TransferDeskError

log = logging.getLogger(__name__)


SAMPLE_PREFIX = "sample:"
SUPPORTED_SUFFIXES = (".csv", ".tsv", ".jsonl")
# An unlabelled pool may also be plain text, one message per line.
POOL_SUFFIXES = (*SUPPORTED_SUFFIXES, ".txt")
# A pool whose messages are mostly validation or test texts is a mistake (the wrong file),


def sample_path(name: str) -> Path:
    """A file of the bundled sample data, e.g. sample_path("retail/train.csv")."""
    return Path(str(files("transferdesk.data") / "sample_data" / name))


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


def decode_lines(
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


def read_records(
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
    lines = decode_lines(resolved.read_bytes(), name, problems)
    suffix = resolved.suffix.lower()
    header = read_records(lines, suffix, name, (), COLUMN_HINT)[2] if task_columns else set()
    tasks = {task: column for task, column in (task_columns or {}).items() if column in header}
    columns = (text_column, label_column, *tasks.values())
    records, more, _ = read_records(lines, suffix, name, columns)
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
