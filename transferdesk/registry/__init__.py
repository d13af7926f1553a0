"""The model registry: self-contained, versioned, checksummed model directories.

Its on-disk format (`versions.py` describes a version's layout) is read and written here
alone: `manifest.py` (file names, manifests, staging), `versions.py` (sealed versions, drafts),
`exports.py` (a version's ONNX export), `stages.py` (production, canary, …), `signing.py` (signed
promotions), `card.py` (the model card), `caches.py` (training work later runs reuse) and
`paths.py` (paths as its files hold them).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transferdesk.errors import TransferDeskError
from transferdesk.registry.caches import Caches, SavesEncoder, TeacherRecord
from transferdesk.registry.card import model_card
from transferdesk.registry.exports import Export, ExportMeta, HeadCheck, RuntimeCheck, save_export
from transferdesk.registry.manifest import (
    ENCODER_DIR,
    EXPORT_DIR,
    MANIFEST,
    ONNX_FILES,
    SOURCES,
    VERSION_RE,
    read_json,
    sha256,
    staging_dir,
    verify,
    write_manifest,
)
from transferdesk.registry.paths import encoder_dir, portable_config, portable_path, split_stage, version_dirs
from transferdesk.registry.signing import Signer, TrustedKeys
from transferdesk.registry.stages import StageEvent, StageRecord, Stages
from transferdesk.registry.versions import (
    Draft,
    ModelVersion,
    SavesPretrained,
    VersionMeta,
    open_version,
    read_version,
    resolve_version_dir,
)

log = logging.getLogger(__name__)

__all__ = [
    "ENCODER_DIR",
    "EXPORT_DIR",
    "MANIFEST",
    "ONNX_FILES",
    "SOURCES",
    "VERSION_RE",
    "Draft",
    "Export",
    "ExportMeta",
    "HeadCheck",
    "ModelVersion",
    "Registry",
    "RuntimeCheck",
    "SavesEncoder",
    "SavesPretrained",
    "Signer",
    "StageEvent",
    "StageRecord",
    "TeacherRecord",
    "TrustedKeys",
    "VersionMeta",
    "encoder_dir",
    "model_card",
    "open_version",
    "portable_config",
    "portable_path",
    "resolve_version_dir",
    "save_export",
    "sha256",
    "split_stage",
    "verify",
    "write_manifest",
]


class Registry(Stages, Caches):
    """A directory of models (`<name>/v<N>/`), their stages, and caches of training work."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @contextmanager
    def draft(self, name: str) -> Iterator[Draft]:
        """A staging directory for a new version of `name`; removed unless published."""
        tmp = staging_dir(self.root / name)
        try:
            yield Draft(self.root, name, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def versions(self, name: str | None = None) -> list[ModelVersion]:
        """Every sealed version (of one model, or of all), oldest first. Listed as the manifests
        describe them, without hashing every file: `open_version` verifies."""
        if not self.root.is_dir():
            raise TransferDeskError(
                f"registry {self.root} does not exist; train a model first "
                "or pass the registry directory (default: registry)"
            )
        found = []
        for model_dir in [self.root / name] if name else sorted(self.root.iterdir()):
            for root in version_dirs(model_dir):
                if (root / MANIFEST).is_file():
                    try:
                        found.append(read_version(root, read_json(root / MANIFEST)))
                    except (TransferDeskError, ValueError) as err:  # one unreadable version hides no other
                        log.warning("skipping %s: %s", root, err)
        return sorted(found, key=lambda v: (v.name, v.version))

    def promote(
        self, spec: str | Path, stage: str, by: str, reason: str, signer: Signer | None = None
    ) -> StageEvent:
        """Point `stage` of the version's model at it, atomically, and log who, when and why
        (signed by `signer`, in its name, where given)."""
        version = open_version(spec)  # a damaged version is never promoted
        if version.path.parent.parent.resolve() != self.root.resolve():
            raise TransferDeskError(f"{version.path} is not a version of registry {self.root}")
        with self._stage_lock(version.name):
            return self._set_stage(version, stage, by, reason, "promote", signer)

    def rollback(
        self, name: str, stage: str, by: str, reason: str, signer: Signer | None = None
    ) -> StageEvent:
        """Point `stage` back at the version it held before its current promotion (repeated
        rollbacks walk further back, as an undo would)."""
        with self._stage_lock(name):
            held: list[int] = []  # the stage's promotions, less those rolled back
            for event in self.stage_log(name):
                if event.stage == stage:
                    held = [*held, event.version] if event.action == "promote" else held[:-1]
            if len(held) < 2:
                raise TransferDeskError(f"{name}@{stage} has no earlier version to roll back to")
            previous = open_version(self.root / name / f"v{held[-2]}")
            return self._set_stage(previous, stage, by, reason, "rollback", signer)

    def portable(self, path: str | Path | None) -> str | None:
        """`path` as this registry's files hold it (see portable_path)."""
        return portable_path(None if path is None else str(path), self.root)
