"""Stages (production, canary, …) of a model: `stages.json` names the version each holds and
its manifest digest, signed by the promoter's key where one was given (signing.py);
`stages.log.jsonl` records every promotion and rollback.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from transferdesk.config import Section
from transferdesk.errors import TransferDeskError
from transferdesk.registry.manifest import (
    MANIFEST,
    STAGE_LOCK,
    STAGE_LOG,
    STAGE_RE,
    STAGES,
    read_json,
    sha256,
)
from transferdesk.registry.signing import Signer, TrustedKeys

if TYPE_CHECKING:
    from transferdesk.registry.versions import ModelVersion

log = logging.getLogger(__name__)


class StageRecord(Section):
    """What a stage holds (stages.json)."""

    version: int
    manifest_sha256: str = Field(description="Digest of the version's manifest when promoted.")
    at: str
    by: str = Field(description="Who promoted: the signing key's holder where it is signed.")
    reason: str
    key_id: str | None = Field(None, description="The signing key's id; unset: not signed.")
    signature: str | None = Field(None, description="Ed25519 over the other fields, the model and the stage.")

    def signed_fields(self, name: str, stage: str) -> dict:
        """What the signature covers: which model's stage, and everything else it says."""
        return {
            "model": name,
            "stage": stage,
            **self.model_dump(include=set(StageRecord.model_fields) - {"signature"}),
        }


class StageEvent(StageRecord):
    """One line of stages.log.jsonl."""

    action: Literal["promote", "rollback"]
    stage: str
    previous: int | None = Field(description="The version the stage held before, if any.")


class Stages:
    """The stages of the models in one registry directory: read, and written one writer at a time."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def stages(self, name: str) -> dict[str, StageRecord]:
        path = self.root / name / STAGES
        if not path.is_file():
            return {}
        return {stage: StageRecord.model_validate(r) for stage, r in read_json(path).items()}

    def stage_log(self, name: str) -> list[StageEvent]:
        path = self.root / name / STAGE_LOG
        if not path.is_file():
            return []
        lines = path.read_text(encoding="utf-8").splitlines()
        return [StageEvent.model_validate_json(line) for line in lines if line.strip()]

    def stage_version(self, name: str, stage: str) -> Path:
        """The version directory a stage holds, after checking it is the one promoted."""
        record = self.stages(name).get(stage)
        if record is None:
            held = ", ".join(sorted(self.stages(name))) or "none"
            raise TransferDeskError(
                f"{self.root / name} has no {stage!r} stage (stages: {held}); promote a version "
                f"first: transferdesk models promote {self.root / name}/v<N> --stage {stage}"
            )
        if (trusted := TrustedKeys.from_env()) is not None:
            trusted.check(f"{name}@{stage}", record.signed_fields(name, stage), record.signature)
        path = self.root / name / f"v{record.version}"
        if not (path / MANIFEST).is_file() or sha256(path / MANIFEST) != record.manifest_sha256:
            raise TransferDeskError(
                f"{name}@{stage} names v{record.version}, but that version's manifest is not the one "
                "promoted (it was replaced or removed); promote a version again"
            )
        return path

    @contextmanager
    def _stage_lock(self, name: str) -> Iterator[None]:
        """One writer of a model's stages at a time, across processes."""
        with open(self.root / name / STAGE_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _set_stage(
        self, version: ModelVersion, stage: str, by: str, reason: str, action: str, signer: Signer | None
    ) -> StageEvent:
        """Under the stage lock: the history line first (flushed to disk), then stages.json
        replaced atomically, so a crash between them leaves a logged change, never an
        unlogged one. Signed by `signer` where given, in its holder's name."""
        if not STAGE_RE.match(stage):
            raise TransferDeskError(
                f"stage {stage!r}: use lower-case letters, digits, - and _, e.g. production"
            )
        model_dir = version.path.parent
        stages = self.stages(version.name)
        event = StageEvent(
            action=action,
            stage=stage,
            version=version.version,
            previous=stages[stage].version if stage in stages else None,
            manifest_sha256=version.manifest_sha256,
            at=datetime.now(UTC).isoformat(timespec="seconds"),
            by=signer.name if signer else by,
            reason=reason,
            key_id=signer.key_id if signer else None,
        )
        if signer is not None:
            event.signature = signer.sign(event.signed_fields(version.name, stage))
        with open(model_dir / STAGE_LOG, "a", encoding="utf-8") as log_file:
            log_file.write(event.model_dump_json() + "\n")
            log_file.flush()
            os.fsync(log_file.fileno())
        stages[stage] = StageRecord(**event.model_dump(include=set(StageRecord.model_fields)))
        tmp = model_dir / f".{STAGES}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps({k: v.model_dump() for k, v in stages.items()}, indent=2))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, model_dir / STAGES)  # readers see the old file or the new one
        return event

    # -- caches of work that later runs reuse: source stages and teacher labels ----------------
