"""The model registry: self-contained, versioned, checksummed model directories.

Layout of one version, `<registry>/<name>/v<N>/`:
    encoder/            encoder + tokenizer (Hugging Face save_pretrained format)  ┐ written by
    head.safetensors    linear head weights                                        │ the model
    classifier.json     labels, out-of-scope threshold and label, pooling, length   ┘ object
    version.json        typed metadata (VersionMeta): backbone, source, timings, …
    config.yaml         the full RunConfig of the run, paths made portable
    metrics.json        test metrics (when a test file was given), validation history, search
    model_card.md       a short human summary, titled with the version number
    test/               evaluate.py's report of the test file (when given): report.md,
                        metrics.json, confusion, reliability and hand-off plots
    search/             trial table, curves and search config (versions exported by `tune`)
    logs/               TensorBoard events of the run
    manifest.json       format, name, version, created, and SHA-256 of every file above;
                        checked on every load
    evaluations/        later `transferdesk evaluate` runs (written after sealing: not covered)
    exports/onnx/       the ONNX runtimes of this version (`transferdesk export`), an artifact
                        set with a manifest of its own that also records the digest of the
                        version's manifest: model.onnx (fp32), model-int8.onnx (dynamic int8
                        quantization), export.json (ExportMeta: agreement with torch fp32).
                        Added after sealing, so exporting never changes the version or the
                        stages that name it; an export of another version's files is refused.
                        `exports/onnx` is a symbolic link to `exports/.onnx-<id>/`, so that
                        `export --replace` swaps one export for the other in one rename
                        (exports written before are a folder there, and still open).
Beside the versions of a model, `<registry>/<name>/`:
    stages.json         stage → version and its manifest digest (production, canary, …)
    stages.log.jsonl    every promotion and rollback: stage, version, who, when, why
A spec `<registry>/<name>@<stage>` names the version a stage holds, refused if the
version's manifest changed since it was promoted.
Source-stage checkpoints, `<registry>/sources/<key>/`, hold an encoder + tokenizer (a
backbone in its own right), `source.json` and their own manifest, checked before reuse;
so do encoders contrastively pre-trained on an unlabelled pool (contrastive.py).
Teacher labels, `<registry>/teachers/<key>/`, hold one teacher's view of an unlabelled pool
(self-training): `pool.json` (the checked pool's messages), `probs.safetensors`
(its probabilities, rows × intents), `teacher.json` (intents, seed, scores) and a manifest.

A version is written into a staging directory and renamed into place, so a crash never
leaves a half-written version, and an existing version is never overwritten. No file holds
a machine path: files inside the registry (source checkpoints) are named relative to it,
data files and local backbones by their name, so a registry copied elsewhere describes
itself truthfully.
A config.yaml written before `joint` and `contrastive` had settings sections of their own
reads as today's (`current_settings`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Protocol

import yaml
from pydantic import Field

from transferdesk.config import RunConfig, Section, build_config
from transferdesk.errors import TransferDeskError
from transferdesk.registry.card import model_card
from transferdesk.registry.exports import Export, ExportMeta
from transferdesk.registry.manifest import (
    CARD,
    CONFIG,
    ENCODER_DIR,
    EXPORT_DIR,
    EXPORT_META,
    FORMAT,
    LOGS_DIR,
    MANIFEST,
    METRICS,
    SEARCH_DIR,
    SOURCE_META,
    TEST_DIR,
    TOKENIZER_FILE,
    UNSEALED,
    VERSION_META,
    move_into_place,
    read_json,
    sha256,
    verify,
    write_manifest,
)
from transferdesk.registry.paths import portable_config, split_stage, version_dirs
from transferdesk.registry.stages import Stages

log = logging.getLogger(__name__)

# Settings that moved to a section of their own: (section, key) then → (section, key) now.
MOVED_SETTINGS = {
    ("source_training", "weight"): ("joint", "weight"),
    ("source_training", "keep_head"): ("joint", "keep_head"),
    ("semi_supervised", "contrastive_epochs"): ("contrastive", "epochs"),
    ("semi_supervised", "contrastive_batch_size"): ("contrastive", "batch_size"),
    ("semi_supervised", "contrastive_lr"): ("contrastive", "lr"),
    ("semi_supervised", "contrastive_temperature"): ("contrastive", "temperature"),
}


def current_settings(data: dict, origin: str) -> RunConfig:
    """A published config.yaml as today's RunConfig: settings that moved are read from where
    they were written, and `source_training.mode: joint` (joint transfer before it was a
    recipe of its own) becomes the same chain with `joint` in place of the source stage."""
    for (section, key), (moved_to, new_key) in MOVED_SETTINGS.items():
        if key in data.get(section, {}):
            data.setdefault(moved_to, {})[new_key] = data[section].pop(key)
    joint = data.get("source_training", {}).pop("mode", "sequential") == "joint"
    cfg = build_config(data, origin)
    return cfg.with_joint_transfer() if joint and not cfg.recipe else cfg


class SavesPretrained(Protocol):
    """What the registry needs of a model: it writes its own files (transferdesk.modeling)."""

    threshold: float
    oos_label: str

    def save_pretrained(self, directory: Path) -> None: ...


class VersionMeta(Section):
    """What a version was trained from and how (version.json)."""

    labels: list[str] = Field(description="Intents in head order.")
    backbone: str = Field(description="The pretrained encoder the run started from, as configured.")
    source: str | None = Field(None, description="Source-task data of the source stage.")
    source_checkpoint: str | None = Field(
        None, description="The cached source-stage checkpoint, relative to the registry."
    )
    candidate: str | None = Field(None, description="The search candidate (versions exported by tune).")
    pretrained: bool = Field(True, description="False for a 'no transfer' control.")
    train_examples: int = Field(ge=0, description="Rows of the target training data.")
    outlier_examples: int = Field(
        0, ge=0, description="Out-of-scope training rows the model was taught to doubt (outlier exposure)."
    )
    tasks: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Other tasks' heads beside the intent's: task → labels in head order.",
    )
    timings: dict[str, float] = Field(default_factory=dict, description="Seconds per stage.")
    device: str = Field("cpu", description="Where it was trained.")


def resolve_version_dir(spec: str | Path) -> Path:
    """A version directory, a model directory meaning its newest version, or `model@stage`:
    the version that stage holds (checked against the digest recorded when it was promoted)."""
    model_dir, stage = split_stage(spec)
    if stage is not None:
        return Stages(model_dir.parent).stage_version(model_dir.name, stage)
    path = Path(spec)
    if not path.exists():
        raise TransferDeskError(
            f"model {spec} not found; see `transferdesk models list REGISTRY` for what exists"
        )
    if (path / MANIFEST).is_file():
        return path
    versions = version_dirs(path)
    if not versions:
        raise TransferDeskError(
            f"{spec} holds no model version (no {MANIFEST}, no v<N>/ inside); "
            "point at a directory printed by `transferdesk train`"
        )
    return versions[-1]


@dataclass(frozen=True)
class ModelVersion:
    """One sealed version: where it is, what it is, and its files as the manifest lists them."""

    path: Path
    name: str
    version: int
    created: str
    format: int
    meta: VersionMeta
    files: dict[str, str] = field(repr=False)

    @property
    def spec(self) -> str:
        return f"{self.name}/v{self.version}"

    @property
    def labels(self) -> list[str]:
        return self.meta.labels

    @property
    def tasks(self) -> dict[str, list[str]]:
        return self.meta.tasks

    @property
    def manifest_sha256(self) -> str:
        """Identifies this exact version: any change to any sealed file changes it."""
        return sha256(self.path / MANIFEST)

    @property
    def tokenizer_sha256(self) -> str | None:
        """Equal for versions that tokenize alike (the Serve tokenizer can stay)."""
        return self.files.get(TOKENIZER_FILE)

    @property
    def encoder_dir(self) -> Path:
        return self.path / ENCODER_DIR

    @property
    def search_dir(self) -> Path:
        """The search's trial table, curves and config (versions exported by tune)."""
        return self.path / SEARCH_DIR

    @cached_property
    def metrics(self) -> dict:
        path = self.path / METRICS
        return read_json(path) if path.is_file() else {}

    @cached_property
    def config(self) -> RunConfig:
        return current_settings(yaml.safe_load((self.path / CONFIG).read_text()), str(self.path / CONFIG))

    @property
    def card(self) -> str:
        return (self.path / CARD).read_text(encoding="utf-8")

    def evaluation_dir(self, label: str) -> Path:
        return self.path / UNSEALED[0] / label

    def has_any_export(self) -> bool:
        """Whether anything is where the version's export goes, sound or not (open_export checks):
        none means torch under runtime auto, a damaged one is refused."""
        return os.path.lexists(self.path / EXPORT_DIR)

    def open_export(self) -> Export:
        """The version's ONNX export, after checking its files against its own manifest, that
        it was made from this version's files, as they are now, and that export.json names
        only the export's own files. An export replaced while it is read is read again."""
        root = self.path / EXPORT_DIR
        tries = 3
        while True:
            directory = root.resolve()  # the files of one export, whatever the link names next
            try:
                return self._read_export(root, directory)
            except TransferDeskError:
                tries -= 1
                if not tries or root.resolve() == directory:  # not replaced meanwhile (--replace)
                    raise

    def _read_export(self, root: Path, directory: Path) -> Export:
        if not (directory / MANIFEST).is_file():
            raise TransferDeskError(
                f"{self.spec} has no ONNX export; make one with `transferdesk export {self.path}`, "
                "or serve it with runtime: torch"
            )
        manifest = verify(directory)
        if manifest.get("parent_manifest_sha256") != self.manifest_sha256:
            raise TransferDeskError(
                f"the ONNX export in {root} was made from other files than {self.spec}'s own (the "
                "version was replaced after exporting); export it again: "
                f"transferdesk export {self.path} --replace true"
            )
        export = Export(
            root,
            ExportMeta.model_validate(read_json(directory / EXPORT_META)),
            frozenset(manifest["files"]),
            directory,
        )
        for runtime in export.meta.runtimes:
            export.file(runtime)  # refused when export.json names a file not its own
        return export

    def summary(self) -> dict:
        """Name, version, path, labels, test metrics and tokenizer digest (for APIs and lists)."""
        test = self.metrics.get("test", {})
        return {
            "name": self.name,
            "version": self.spec,
            "path": str(self.path),
            "created": self.created,
            "labels": self.labels,
            "tasks": self.tasks,
            "backbone": self.meta.backbone,
            "source": self.meta.source,
            "tokenizer_sha256": self.tokenizer_sha256,
            "metrics": {k: test[k] for k in ("accuracy", "macro_f1") if k in test},
        }


def read_version(root: Path, manifest: dict) -> ModelVersion:
    fmt = manifest.get("format", 1)
    if fmt != FORMAT:
        newer = "a newer TransferDesk: upgrade it" if fmt > FORMAT else "a development build: train it again"
        raise TransferDeskError(
            f"{root} has registry format {fmt}, this TransferDesk reads format {FORMAT}; "
            f"it was written by {newer}"
        )
    try:
        meta = VersionMeta.model_validate(read_json(root / VERSION_META))
    except FileNotFoundError as err:
        hint = " (a source checkpoint: use it as --backbone)" if (root / SOURCE_META).is_file() else ""
        raise TransferDeskError(
            f"{root} is not a model version: no {Path(err.filename).name}{hint}"
        ) from None
    except (KeyError, ValueError) as err:
        raise TransferDeskError(
            f"{root}: its metadata cannot be read ({type(err).__name__}: {err}); train it again, or load "
            "its encoder/ as a backbone (--backbone) to re-train from it"
        ) from None
    return ModelVersion(
        path=root,
        name=manifest.get("name") or root.parent.name,
        version=int(manifest.get("version") or root.name[1:]),
        created=manifest.get("created", ""),
        format=fmt,
        meta=meta,
        files=manifest["files"],
    )


def open_version(spec: str | Path) -> ModelVersion:
    """Resolve a version (or a model directory: its newest version), verify every file
    against its manifest, and describe it. Weights are loaded by the model object."""
    root = resolve_version_dir(spec)
    return read_version(root, verify(root))


@dataclass
class Draft:
    """A version being written. Runs put their own artifacts under `path` (logs/, test/,
    search/) while they work; `publish` adds the model and metadata and seals it."""

    root: Path  # the registry's
    name: str
    path: Path

    @property
    def logs_dir(self) -> Path:
        return self.path / LOGS_DIR

    @property
    def test_dir(self) -> Path:
        return self.path / TEST_DIR

    @property
    def search_dir(self) -> Path:
        return self.path / SEARCH_DIR

    def publish(
        self, model: SavesPretrained, cfg: RunConfig, meta: VersionMeta, metrics: dict
    ) -> ModelVersion:
        cfg = portable_config(cfg.model_copy(update={"name": self.name}), self.root)
        model.save_pretrained(self.path)
        (self.path / CONFIG).write_text(cfg.to_yaml())
        (self.path / VERSION_META).write_text(meta.model_dump_json(indent=2))
        (self.path / METRICS).write_text(json.dumps(metrics, indent=2))
        model_dir = self.root / self.name
        while True:
            number = _next_version(model_dir)
            final = model_dir / f"v{number}"
            (self.path / CARD).write_text(
                model_card(cfg, f"v{number}", meta, metrics, model), encoding="utf-8"
            )
            created = datetime.now(UTC).isoformat(timespec="seconds")
            write_manifest(
                self.path, {"format": FORMAT, "name": self.name, "version": number, "created": created}
            )
            try:
                move_into_place(self.path, final)  # fails if another run took this number meanwhile
            except OSError:
                if not final.exists():
                    raise
                continue
            return open_version(final)


def _next_version(model_dir: Path) -> int:
    versions = version_dirs(model_dir)
    return int(versions[-1].name[1:]) + 1 if versions else 1
