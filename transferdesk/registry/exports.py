"""A version's ONNX export, `exports/onnx/` (the layout: versions.py): what it holds and how
it was checked (ExportMeta, export.json), the export as a version opens it (Export), and
sealing a new one beside the version (save_export), swapped in by one rename.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field

from transferdesk.config import Section
from transferdesk.errors import TransferDeskError
from transferdesk.registry.manifest import (
    EXPORT_DIR,
    EXPORT_META,
    FORMAT,
    MANIFEST,
    fsync_dir,
    move_into_place,
    staging_dir,
    write_manifest,
)

if TYPE_CHECKING:
    from transferdesk.registry.versions import ModelVersion


class HeadCheck(Section):
    """How one exported runtime's answers of another head (task) compared with torch fp32's."""

    argmax_agreement: float = Field(description="Share of messages with the same top label.")
    accuracy: float | None = Field(description="On the rows labelled for the task; null: none are.")
    torch_accuracy: float | None


class RuntimeCheck(Section):
    """How one exported runtime compared with torch fp32 on the version's validation data."""

    file: str
    argmax_agreement: float = Field(description="Share of messages with the same top intent.")
    max_prob_diff: float = Field(description="Largest |probability difference| over all intents.")
    threshold: float | None = Field(
        None,
        description="This runtime's out-of-scope threshold, chosen on the validation data as training "
        "chose torch's (its confidences differ a little); null in exports made before: the version's.",
    )
    accuracy: float = Field(
        description="With the out-of-scope rule at this runtime's threshold where the data has "
        "out-of-scope rows; by top intent alone where it has none (as `evaluate` scores)."
    )
    torch_accuracy: float
    accuracy_drop_points: float = Field(description="torch_accuracy - accuracy, in points.")
    size_mb: float
    heads: dict[str, HeadCheck] = Field(default_factory=dict, description="Each other head's, by task.")

    def head_drops(self) -> dict[str, float]:
        """Accuracy lost by each head that could be scored, in points (unrounded)."""
        return {
            task: (check.torch_accuracy - check.accuracy) * 100
            for task, check in self.heads.items()
            if check.accuracy is not None and check.torch_accuracy is not None
        }


class ExportMeta(Section):
    """What an export holds and how it was checked (exports/onnx/export.json)."""

    parent: str = Field(description="The version exported, <name>/v<N>.")
    parent_manifest_sha256: str = Field(description="Digest of that version's manifest.")
    created: str
    opset: int
    exporter: dict[str, str] = Field(description="torch, onnx and onnxruntime versions.")
    validation: str = Field(description="The data the runtimes were checked on.")
    validation_rows: int
    max_accuracy_drop_points: float = Field(
        description="The largest accuracy loss allowed: max_accuracy_drop, or one message if more."
    )
    runtimes: dict[str, RuntimeCheck]


@dataclass(frozen=True)
class Export:
    """A version's verified ONNX export: `path` as the version names it (exports/onnx),
    `directory` where the files verified are (the link's target when opened), `files` the
    names its manifest lists."""

    path: Path
    meta: ExportMeta
    files: frozenset[str] = frozenset()
    directory: Path | None = None

    def file(self, runtime: str) -> Path:
        if runtime not in self.meta.runtimes:
            held = ", ".join(self.meta.runtimes) or "none"
            wanted = ", ".join([*self.meta.runtimes, runtime])  # keep what replicas may use now
            raise TransferDeskError(
                f"the export of {self.meta.parent} holds no {runtime} runtime (it holds: {held}); "
                f"export it again: transferdesk export <version> --runtimes '[{wanted}]' --replace true"
            )
        name = self.meta.runtimes[runtime].file
        if problem := _not_own_file(name, self.files):
            raise TransferDeskError(
                f"refusing the export in {self.path}: its {EXPORT_META} names {name!r} as the {runtime} "
                f"runtime's file, {problem}. The export was tampered with; export it again: "
                f"transferdesk export <version> --replace true"
            )
        return (self.directory or self.path) / name

    def threshold(self, runtime: str) -> float | None:
        """The runtime's own out-of-scope threshold, when the export chose one."""
        return self.meta.runtimes[runtime].threshold


def _not_own_file(name: str, files: frozenset[str]) -> str | None:
    """Why `name` is not one of an export's own runtime files (None: it is)."""
    if Path(name).is_absolute():
        return "an absolute path"
    if ".." in Path(name).parts:
        return "a path with '..'"
    if name not in files or name in (MANIFEST, EXPORT_META):
        return "which is not one of the export's own files (those its manifest lists)"
    return None


def save_export(
    version: ModelVersion, write: Callable[[Path], None], meta: ExportMeta, replace: bool
) -> Export:
    """Seal the files `write` puts in a scratch directory, with `meta`, as the version's export.
    An existing export is kept unless `replace`. The export is renamed into a folder of its own,
    `exports/.onnx-<id>/`, and `exports/onnx` is a link to it, created (or, to replace, swapped
    for the old one) in one rename: a reader finds the old export or the new one, never none and
    never a mix. The old one is removed after the swap. (An export made before the link, a
    folder at `exports/onnx`, is set aside first: replacing one of those has a moment without.)"""
    target = version.path / EXPORT_DIR
    exists = f"{version.spec} already has an ONNX export ({target}); add --replace true"
    if os.path.lexists(target) and not replace:
        raise TransferDeskError(exists)
    tmp = staging_dir(target.parent)
    final = target.with_name(f".{target.name}-{time.time_ns()}-{os.getpid()}")
    link = target.with_name(f".{target.name}-link-{time.time_ns()}-{os.getpid()}")
    old: Path | None = None
    placed = False
    try:
        write(tmp)
        (tmp / EXPORT_META).write_text(meta.model_dump_json(indent=2))
        parent = {"parent": meta.parent, "parent_manifest_sha256": meta.parent_manifest_sha256}
        write_manifest(tmp, {"format": FORMAT, **parent})
        move_into_place(tmp, final)
        if not replace:
            try:  # an export made meanwhile by another run is never overwritten without --replace
                os.symlink(final.name, target)
            except FileExistsError:
                raise TransferDeskError(exists) from None
        else:
            old = _old_export(target)
            os.symlink(final.name, link)
            os.replace(link, target)  # the swap: one rename
        fsync_dir(target.parent)
        placed = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not placed:
            shutil.rmtree(final, ignore_errors=True)
            if old is not None and old.name.startswith(".replaced-") and not os.path.lexists(target):
                os.rename(old, target)  # the earlier-format export set aside: put it back
        if os.path.lexists(link):
            os.unlink(link)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return version.open_export()


def _old_export(target: Path) -> Path | None:
    """The folder of the export `target` names now, to remove once replaced: the link's target,
    or, for an export made before exports were linked, the folder itself, set aside now."""
    if os.path.islink(target):
        held = target.parent / os.readlink(target)
        return held if held.parent == target.parent and held.name.startswith(f".{target.name}-") else None
    if target.is_dir():
        aside = target.with_name(f".replaced-{time.time_ns()}")
        os.rename(target, aside)
        return aside
    return None
