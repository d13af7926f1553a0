"""Caches of training work that later runs reuse, each entry sealed by its own manifest and
checked before reuse: source-stage checkpoints (`sources/<key>/`: an encoder and tokenizer,
a backbone in its own right, and `source.json`), encoders contrastively pre-trained on a
pool (likewise), and teachers' labels of a pool (`teachers/<key>/`: `pool.json`, the
messages; `probs.safetensors`, rows × intents; `teacher.json`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from safetensors.numpy import load_file, save_file

from transferdesk.errors import TransferDeskError
from transferdesk.registry.manifest import (
    FORMAT,
    SOURCE_META,
    SOURCES,
    TEACHER_META,
    TEACHER_POOL,
    TEACHER_PROBS,
    TEACHERS,
    move_into_place,
    read_json,
    staging_dir,
    verify,
    write_manifest,
)

log = logging.getLogger(__name__)


class SavesEncoder(Protocol):
    def save_encoder(self, directory: Path) -> None: ...


@dataclass
class TeacherRecord:
    """A teacher's probabilities over a pool, as cached (see Registry.save_teacher_labels)."""

    texts: list[str]
    probs: np.ndarray
    info: dict
    path: Path


class Caches:
    """The caches of one registry directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _cached(self, kind: str, key: str) -> Path | None:
        """A cache entry, verified against its manifest; a damaged or unsealed one is set aside
        (and so computed again) rather than reused."""
        path = self.root / kind / key
        if not path.exists():
            return None
        try:
            verify(path)
            return path
        except TransferDeskError as err:
            aside = path.with_name(f".damaged-{key}-{time.time_ns()}-{os.getpid()}")
            log.warning(
                "%s entry %s does not match its manifest; moved to %s, computing it again", kind, key, aside
            )
            log.debug("%s", err)
            with contextlib.suppress(FileNotFoundError):  # another run set it aside first
                os.rename(path, aside)
            return None

    def _store(self, kind: str, key: str, write: Callable[[Path], None]) -> Path:
        """Seal what `write` puts in a scratch directory and rename it into the cache (durably:
        see move_into_place)."""
        target = self.root / kind / key
        tmp = staging_dir(target.parent)
        try:
            write(tmp)
            write_manifest(tmp, {"format": FORMAT, f"{kind.rstrip('s')}_key": key})
            for _ in range(2):
                try:
                    move_into_place(tmp, target)
                    break
                except OSError:
                    # Another run finished the same work first: its entry is as good as this
                    # one, unless it is damaged, in which case it is set aside and replaced.
                    if self._cached(kind, key) is not None:
                        break
            else:
                raise TransferDeskError(f"could not store {target}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def source_checkpoint(self, key: str) -> Path | None:
        return self._cached(SOURCES, key)

    def save_source(self, model: SavesEncoder, key: str, info: dict) -> Path:
        """A source-stage encoder, usable later as a backbone (`--backbone <dir>`)."""

        def write(tmp: Path) -> None:
            model.save_encoder(tmp)
            (tmp / SOURCE_META).write_text(json.dumps(info, indent=2))

        return self._store(SOURCES, key, write)

    def teacher_labels(self, key: str) -> TeacherRecord | None:
        if (path := self._cached(TEACHERS, key)) is None:
            return None
        texts = read_json(path / TEACHER_POOL)
        probs = load_file(path / TEACHER_PROBS)["probs"]
        if len(texts) != len(probs):  # sealed so, so written so: a bug, not damage
            raise TransferDeskError(f"{path}: {len(texts)} messages but {len(probs)} rows of probabilities")
        return TeacherRecord(texts, probs, read_json(path / TEACHER_META), path)

    def save_teacher_labels(self, key: str, texts: list[str], probs: np.ndarray, info: dict) -> TeacherRecord:
        """One teacher's probabilities over a pool (info: its intents, in column order, and more)."""

        def write(tmp: Path) -> None:
            # JSON, not lines: a CSV or JSONL message may hold line breaks of its own.
            (tmp / TEACHER_POOL).write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8")
            save_file({"probs": np.ascontiguousarray(probs, dtype=np.float32)}, tmp / TEACHER_PROBS)
            (tmp / TEACHER_META).write_text(json.dumps(info, indent=2))

        return TeacherRecord(texts, probs, info, self._store(TEACHERS, key, write))
