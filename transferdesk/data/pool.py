"""Unlabelled pools of customer messages (self-training and contrastive pre-training)."""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from dataclasses import dataclass, field

from transferdesk.data.dataset import Dataset, Problem
from transferdesk.data.files import POOL_SUFFIXES, decode_lines, read_records, resolve_path

log = logging.getLogger(__name__)

# A pool whose messages are mostly validation or test texts is a mistake (the wrong file),
# not a pool with some overlap to drop.
MAX_EVAL_OVERLAP = 0.5


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
    lines = decode_lines(raw, name, problems, severity="warning")
    bad_lines = {p.row for p in problems}
    hint = "data.unlabelled_column (--data.unlabelled_column NAME)"
    records, more, _ = read_records(lines, resolved.suffix.lower(), name, (column,), hint)
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
