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
Versions of format 1 (before version.json) still open; their metadata is translated here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import yaml
from pydantic import Field
from safetensors.numpy import load_file, save_file

from transferdesk.confidence import INTERVAL_CONFIDENCE
from transferdesk.config import RunConfig, Section, build_config
from transferdesk.data import SAMPLE_PREFIX
from transferdesk.errors import TransferDeskError

log = logging.getLogger(__name__)

FORMAT = 2
MANIFEST = "manifest.json"
VERSION_META = "version.json"
CONFIG = "config.yaml"
METRICS = "metrics.json"
CARD = "model_card.md"
SOURCE_META = "source.json"
SOURCES = "sources"
TEACHERS = "teachers"
TEACHER_META, TEACHER_POOL, TEACHER_PROBS = "teacher.json", "pool.json", "probs.safetensors"
# The model object writes its encoder and tokenizer here; a version is a backbone through it.
ENCODER_DIR = "encoder"
TOKENIZER_FILE = f"{ENCODER_DIR}/tokenizer.json"
# Written after a version is sealed (evaluations, exports), so not covered by its manifest.
UNSEALED = ("evaluations", "exports")
EXPORT_DIR, EXPORT_META = "exports/onnx", "export.json"
# The ONNX runtimes an export can hold, and their files.
ONNX_FILES = {"onnx": "model.onnx", "onnx-int8": "model-int8.onnx"}
# Folders a run fills while its version is a draft.
LOGS_DIR, TEST_DIR, SEARCH_DIR = "logs", "test", "search"
VERSION_RE = re.compile(r"^v(\d+)$")
STAGING_PREFIX = ".staging-"
STAGES = "stages.json"
STAGE_LOG = "stages.log.jsonl"
STAGE_LOCK = ".stages.lock"
STAGE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


class StageRecord(Section):
    """What a stage holds (stages.json)."""

    version: int
    manifest_sha256: str = Field(description="Digest of the version's manifest when promoted.")
    at: str
    by: str
    reason: str


class StageEvent(StageRecord):
    """One line of stages.log.jsonl."""

    action: Literal["promote", "rollback"]
    stage: str
    previous: int | None = Field(description="The version the stage held before, if any.")


class SavesPretrained(Protocol):
    """What the registry needs of a model: it writes its own files (transferdesk.modeling)."""

    threshold: float
    oos_label: str

    def save_pretrained(self, directory: Path) -> None: ...


class SavesEncoder(Protocol):
    def save_encoder(self, directory: Path) -> None: ...


@dataclass
class TeacherRecord:
    """A teacher's probabilities over a pool, as cached (see Registry.save_teacher_labels)."""

    texts: list[str]
    probs: np.ndarray
    info: dict
    path: Path


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
    """A version's verified ONNX export."""

    path: Path
    meta: ExportMeta

    def file(self, runtime: str) -> Path:
        if runtime not in self.meta.runtimes:
            held = ", ".join(self.meta.runtimes) or "none"
            wanted = ", ".join([*self.meta.runtimes, runtime])  # keep what replicas may use now
            raise TransferDeskError(
                f"the export of {self.meta.parent} holds no {runtime} runtime (it holds: {held}); "
                f"export it again: transferdesk export <version> --runtimes '[{wanted}]' --replace true"
            )
        return self.path / self.meta.runtimes[runtime].file

    def threshold(self, runtime: str) -> float | None:
        """The runtime's own out-of-scope threshold, when the export chose one."""
        return self.meta.runtimes[runtime].threshold


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


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sealed_files(root: Path) -> list[Path]:
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.name != MANIFEST and p.relative_to(root).parts[0] not in UNSEALED
    )


def write_manifest(root: Path, extra: dict | None = None) -> None:
    files = {str(p.relative_to(root)): sha256(p) for p in _sealed_files(root)}
    (root / MANIFEST).write_text(json.dumps({**(extra or {}), "files": files}, indent=2))


def verify(root: Path) -> dict:
    """The manifest, after checking every file it lists exists unchanged."""
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise TransferDeskError(
            f"{root} is not a registry model (no {MANIFEST}); point at a version directory "
            "such as registry/intent-classifier/v1 (see `transferdesk models list`)"
        )
    manifest = json.loads(manifest_path.read_text())
    missing = [f for f in manifest["files"] if not (root / f).is_file()]
    altered = [
        f for f, digest in manifest["files"].items() if f not in missing and sha256(root / f) != digest
    ]
    if missing or altered:
        details = "; ".join(
            part
            for part in (
                f"missing: {', '.join(missing)}" if missing else "",
                f"altered: {', '.join(altered)}" if altered else "",
            )
            if part
        )
        raise TransferDeskError(
            f"refusing to load {root}: its files do not match its manifest ({details}). "
            "The model was changed or damaged after it was saved; restore it from a copy "
            "or train it again"
        )
    return manifest


def portable_path(path: str | None, registry: Path | None = None) -> str | None:
    """A path as a registry file may hold it: inside the registry, relative to it; any other
    local file or directory, its name alone (a machine path means nothing on another machine);
    sample: specs, hub ids and URLs as they are."""
    if path is None or path.startswith(SAMPLE_PREFIX) or "://" in path:
        return path
    local = Path(path).expanduser()
    if not (local.is_absolute() or local.exists()):  # a hub id, or a name already
        return path
    if registry is not None and local.resolve().is_relative_to(registry.resolve()):
        return str(local.resolve().relative_to(registry.resolve()))
    return local.name


def portable_config(cfg: RunConfig, registry: Path) -> RunConfig:
    data = cfg.data.model_copy(
        update={
            k: portable_path(getattr(cfg.data, k)) for k in ("train", "valid", "test", "source", "unlabelled")
        }
        | {"extra_train": [portable_path(path) for path in cfg.data.extra_train]}
        | {
            "tasks": {
                task: settings.model_copy(update={"train": portable_path(settings.train)})
                for task, settings in cfg.data.tasks.items()
            }
        }
    )
    model = cfg.model.model_copy(update={"backbone": portable_path(cfg.model.backbone, registry)})
    teacher = portable_path(cfg.semi_supervised.teacher_backbone, registry)
    semi = cfg.semi_supervised.model_copy(update={"teacher_backbone": teacher})
    update = {"data": data, "model": model, "semi_supervised": semi, "output": "registry"}
    return cfg.model_copy(update=update)


def encoder_dir(path: Path) -> Path:
    """The Hugging Face model directory inside a registry version (a version is a backbone)."""
    if (path / MANIFEST).is_file() and (path / ENCODER_DIR).is_dir():
        return path / ENCODER_DIR
    return path


def version_dirs(model_dir: Path) -> list[Path]:
    """The v<N> directories of one model, oldest first."""
    found = [(int(m.group(1)), p) for p in model_dir.glob("v*") if (m := VERSION_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def split_stage(spec: str | Path) -> tuple[Path, str | None]:
    """`registry/name@production` → (registry/name, "production"); other specs, no stage."""
    text = str(spec)
    model, sep, stage = text.rpartition("@")
    if not sep or "/" in stage:
        return Path(text), None
    return Path(model), stage


def resolve_version_dir(spec: str | Path) -> Path:
    """A version directory, a model directory meaning its newest version, or `model@stage`:
    the version that stage holds (checked against the digest recorded when it was promoted)."""
    model_dir, stage = split_stage(spec)
    if stage is not None:
        return Registry(model_dir.parent).stage_version(model_dir.name, stage)
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


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


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
        return _read_json(path) if path.is_file() else {}

    @cached_property
    def config(self) -> RunConfig:
        return build_config(yaml.safe_load((self.path / CONFIG).read_text()), str(self.path / CONFIG))

    @property
    def card(self) -> str:
        return (self.path / CARD).read_text(encoding="utf-8")

    @property
    def legacy_classifier(self) -> dict | None:
        """Format 1 kept the classifier's settings in registry files; they are read here so
        that the model object only ever reads its own (None for current versions)."""
        if self.format >= 2:
            return None
        info = _read_json(self.path / "model.json")
        return {
            "labels": _read_json(self.path / "labels.json"),
            "threshold": info["threshold"],
            "oos_label": self.config.data.oos_label,
            **self.config.model.model_dump(include={"pooling", "dropout", "max_length"}),
        }

    def evaluation_dir(self, label: str) -> Path:
        return self.path / UNSEALED[0] / label

    def has_export(self, runtime: str) -> bool:
        """Whether an export of this runtime is present (not yet verified: open_export does)."""
        meta = self.path / EXPORT_DIR / EXPORT_META
        return meta.is_file() and runtime in _read_json(meta).get("runtimes", {})

    def open_export(self) -> Export:
        """The version's ONNX export, after checking its files against its own manifest and
        that it was made from this version's files, as they are now."""
        root = self.path / EXPORT_DIR
        if not (root / MANIFEST).is_file():
            raise TransferDeskError(
                f"{self.spec} has no ONNX export; make one with `transferdesk export {self.path}`, "
                "or serve it with runtime: torch"
            )
        manifest = verify(root)
        if manifest.get("parent_manifest_sha256") != self.manifest_sha256:
            raise TransferDeskError(
                f"the ONNX export in {root} was made from other files than {self.spec}'s own (the "
                "version was replaced after exporting); export it again: "
                f"transferdesk export {self.path} --replace true"
            )
        return Export(root, ExportMeta.model_validate(_read_json(root / EXPORT_META)))

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


def _outliers_note(meta: VersionMeta) -> str:
    return f"; {meta.outlier_examples} out-of-scope ones taught as outliers" if meta.outlier_examples else ""


def _legacy_meta(root: Path) -> VersionMeta:
    """Format 1's model.json, which held absolute source-checkpoint paths, as VersionMeta."""
    info = _read_json(root / "model.json")
    checkpoint = info.get("source_checkpoint")
    return VersionMeta(
        labels=info["labels"],
        backbone=portable_path(info.get("backbone")) or "unknown",
        source=portable_path(info.get("source")),
        source_checkpoint=f"{SOURCES}/{Path(checkpoint).name}" if checkpoint else None,
        candidate=info.get("candidate"),
        pretrained=info.get("pretrained", True),
        train_examples=info.get("train_examples", 0),
        timings=info.get("timings", {}),
        device=info.get("device", "cpu"),
    )


def _read_version(root: Path, manifest: dict) -> ModelVersion:
    fmt = manifest.get("format", 1)
    if fmt > FORMAT:
        raise TransferDeskError(
            f"{root} was written by a newer TransferDesk (registry format {fmt}, this one reads up "
            f"to {FORMAT}); upgrade TransferDesk to load it"
        )
    try:
        meta = VersionMeta.model_validate(_read_json(root / VERSION_META)) if fmt >= 2 else _legacy_meta(root)
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
    return _read_version(root, verify(root))


OBJECTIVES = {"cross_entropy": "cross-entropy", "supcon": "cross-entropy plus supervised contrastive loss"}


def model_card(cfg: RunConfig, version: str, meta: VersionMeta, metrics: dict, model: SavesPretrained) -> str:
    test = metrics.get("test", {})
    lines = [
        f"# {cfg.name} {version}",
        "",
        f"Intent classifier: {meta.backbone} encoder ({cfg.model.pooling} pooling) + linear head, "
        f"fine-tuned with AdamW and {OBJECTIVES[cfg.training.objective]}.",
        "",
        f"- Target data: `{cfg.data.train}`{''.join(f' + `{path}`' for path in cfg.data.extra_train)} "
        f"({meta.train_examples} examples, {len(meta.labels)} intents{_outliers_note(meta)})",
        f"- Source stage: {'`' + meta.source + '`' if meta.source else 'none'}",
        *_confidence_lines(cfg, model, metrics),
        *_task_lines(cfg, meta, test),
        f"- Training time: {meta.timings.get('train_seconds', 0):.0f} s on {meta.device}",
    ]
    if semi := metrics.get("semi_supervised"):
        pool, settings = semi["pool"], semi["settings"]
        uses = []
        if semi.get("contrastive_encoder"):  # absent from versions made before it existed
            uses.append(
                f"contrastive pre-training on it first ({settings['contrastive_epochs']} epoch(s), "
                f"encoder `{semi['contrastive_encoder']}`)"
            )
        if semi["teachers"]:
            teachers = f"{len(semi['teachers'])} teacher(s)"
            if settings.get("teacher_backbone"):
                teachers += f" fine-tuned from `{settings['teacher_backbone']}`"
            uses.append(
                f"{teachers}, {settings['rounds']} round(s), {settings['targets']} targets, "
                f"threshold {settings['threshold']}"
                # absent from versions made before neighbours existed
                + (
                    f", each message's probabilities mixed with its {n} nearest"
                    if (n := settings.get("neighbours"))
                    else ""
                )
            )
        lines.append(
            f"- Unlabelled pool: `{pool['file']}` ({pool['rows_used']} of {pool['rows_read']} messages used, "
            f"sha256 {pool['sha256'][:12]}); {'; '.join(uses)}"
        )
        if semi["rounds"]:
            kept = ", ".join(
                f"{r['pseudo_labels']} ({r['agreement_with_teacher']:.1%})" for r in semi["rounds"]
            )
            lines.append(f"- Pseudo-labels kept per round (and the student's agreement with them): {kept}")
    if meta.candidate:
        lines.append(f"- Chosen by a Ray Tune search: candidate `{meta.candidate}` (see search/)")
    if test:
        lines.append(
            f"- Test accuracy {test['accuracy']:.2%}, macro-F1 {test['macro_f1']:.2%} on `{test['data']}`"
        )
    lines += [
        "",
        "Intended use: routing customer messages; low-confidence predictions should "
        "go to a human agent. Evaluate on your own traffic before relying on it.",
    ]
    return "\n".join(lines) + "\n"


def _confidence_lines(cfg: RunConfig, model: SavesPretrained, metrics: dict) -> list[str]:
    """How confidences were calibrated and the hand-off threshold chosen, and what it did on test."""
    chosen, target = metrics.get("calibration") or {}, cfg.calibration
    goal = target.target if target.value is None else f"{target.target} {target.value}"
    lines = [
        f"- Out-of-scope threshold: {model.threshold:.3f} on the {target.score} score (below it → "
        f"`{model.oos_label}`, a human), chosen on validation data for target `{goal}`"
    ]
    if chosen:
        lines.append(
            f"- Calibration: temperature {chosen['fitted_temperature']:.2f} (validation expected calibration "
            f"error {chosen['valid_ece_before']:.3f} → {chosen['valid_ece_after']:.3f})"
        )
    if interval := chosen.get("valid", {}).get("target_interval"):
        lines.append(
            f"- The threshold's {chosen['valid']['target']} was measured on {chosen['valid']['target_rows']} "
            f"validation row(s): on traffic like them it is likely ({INTERVAL_CONFIDENCE:.0%}) between "
            f"{interval[0]:.1%} and {interval[1]:.1%}"
        )
    if point := metrics.get("test", {}).get("operating_point"):
        recall = "" if point["oos_recall"] is None else f", out-of-scope recall {point['oos_recall']:.1%}"
        lines.append(
            f"- On test: {point['handoff_rate']:.1%} of in-scope messages handed off, routed messages "
            f"{point['precision']:.1%} right{recall}"
        )
    return lines


def _task_lines(cfg: RunConfig, meta: VersionMeta, test: dict) -> list[str]:
    """The other tasks the model predicts, and how the source task was used."""
    lines = []
    for task, labels in meta.tasks.items():
        scored = test.get("tasks", {}).get(task)
        score = (
            f"; test accuracy {scored['accuracy']:.2%}, macro-F1 {scored['macro_f1']:.2%}" if scored else ""
        )
        lines.append(
            f"- Task `{task}`: a head of its own over the shared encoder ({', '.join(labels)}){score}"
        )
    if meta.source:
        lines.append(f"- Transfer from the source task: {cfg.source_training.mode}")
    return lines


def _staging_dir(parent: Path) -> Path:
    """A scratch directory beside its destination (same filesystem: the final rename is atomic)."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=parent))


@dataclass
class Draft:
    """A version being written. Runs put their own artifacts under `path` (logs/, test/,
    search/) while they work; `publish` adds the model and metadata and seals it."""

    registry: Registry
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
        cfg = portable_config(cfg.model_copy(update={"name": self.name}), self.registry.root)
        model.save_pretrained(self.path)
        (self.path / CONFIG).write_text(cfg.to_yaml())
        (self.path / VERSION_META).write_text(meta.model_dump_json(indent=2))
        (self.path / METRICS).write_text(json.dumps(metrics, indent=2))
        model_dir = self.registry.root / self.name
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
                os.rename(self.path, final)  # fails if another run took this number meanwhile
            except OSError:
                if not final.exists():
                    raise
                continue
            return open_version(final)


def save_export(
    version: ModelVersion, write: Callable[[Path], None], meta: ExportMeta, replace: bool
) -> Export:
    """Seal the files `write` puts in a scratch directory, with `meta`, as the version's export.
    An existing export is kept unless `replace`; then it is set aside and the new one renamed
    in (a reader in between finds none and says so; it never reads a mix of the two)."""
    target = version.path / EXPORT_DIR
    exists = f"{version.spec} already has an ONNX export ({target}); add --replace true"
    if target.exists() and not replace:
        raise TransferDeskError(exists)
    tmp = _staging_dir(target.parent)
    try:
        write(tmp)
        (tmp / EXPORT_META).write_text(meta.model_dump_json(indent=2))
        parent = {"parent": meta.parent, "parent_manifest_sha256": meta.parent_manifest_sha256}
        write_manifest(tmp, {"format": FORMAT, **parent})
        aside = target.with_name(f".replaced-{time.time_ns()}")
        if replace:
            with contextlib.suppress(FileNotFoundError):
                os.rename(target, aside)
        try:
            # Onto a non-empty directory rename fails: an export made meanwhile by another run
            # is never overwritten without --replace.
            os.rename(tmp, target)
        except OSError:
            if aside.exists():  # put the one set aside back
                os.rename(aside, target)
            raise TransferDeskError(exists) from None
        shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return version.open_export()


def _next_version(model_dir: Path) -> int:
    versions = version_dirs(model_dir)
    return int(versions[-1].name[1:]) + 1 if versions else 1


class Registry:
    """A directory of models (`<name>/v<N>/`) and of cached source-stage checkpoints."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @contextmanager
    def draft(self, name: str) -> Iterator[Draft]:
        """A staging directory for a new version of `name`; removed unless published."""
        tmp = _staging_dir(self.root / name)
        try:
            yield Draft(self, name, tmp)
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
                        found.append(_read_version(root, _read_json(root / MANIFEST)))
                    except (TransferDeskError, ValueError) as err:  # one unreadable version hides no other
                        log.warning("skipping %s: %s", root, err)
        return sorted(found, key=lambda v: (v.name, v.version))

    # -- stages ---------------------------------------------------------------------------------

    def stages(self, name: str) -> dict[str, StageRecord]:
        path = self.root / name / STAGES
        if not path.is_file():
            return {}
        return {stage: StageRecord.model_validate(r) for stage, r in _read_json(path).items()}

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
        path = self.root / name / f"v{record.version}"
        if not (path / MANIFEST).is_file() or sha256(path / MANIFEST) != record.manifest_sha256:
            raise TransferDeskError(
                f"{name}@{stage} names v{record.version}, but that version's manifest is not the one "
                "promoted (it was replaced or removed); promote a version again"
            )
        return path

    def promote(self, spec: str | Path, stage: str, by: str, reason: str) -> StageEvent:
        """Point `stage` of the version's model at it, atomically, and log who, when and why."""
        version = open_version(spec)  # a damaged version is never promoted
        if version.path.parent.parent.resolve() != self.root.resolve():
            raise TransferDeskError(f"{version.path} is not a version of registry {self.root}")
        with self._stage_lock(version.name):
            return self._set_stage(version, stage, by, reason, "promote")

    def rollback(self, name: str, stage: str, by: str, reason: str) -> StageEvent:
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
            return self._set_stage(previous, stage, by, reason, "rollback")

    @contextmanager
    def _stage_lock(self, name: str) -> Iterator[None]:
        """One writer of a model's stages at a time, across processes."""
        with open(self.root / name / STAGE_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _set_stage(self, version: ModelVersion, stage: str, by: str, reason: str, action: str) -> StageEvent:
        """Under the stage lock: the history line first (flushed to disk), then stages.json
        replaced atomically, so a crash between them leaves a logged change, never an
        unlogged one."""
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
            by=by,
            reason=reason,
        )
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

    def _cached(self, kind: str, key: str) -> Path | None:
        """A cache entry, verified against its manifest; a damaged or unsealed one is set aside
        (and so computed again) rather than reused."""
        path = self.root / kind / key
        if not path.exists():
            return None
        if kind == SOURCES and not (path / MANIFEST).is_file() and (path / SOURCE_META).is_file():
            # Cached before checkpoints were sealed: sealed now, as it is, rather than retrained.
            log.info("source checkpoint %s predates manifests; sealing it for reuse", key)
            write_manifest(path, {"format": FORMAT, "source_key": key})
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
        """Seal what `write` puts in a scratch directory and rename it into the cache."""
        target = self.root / kind / key
        tmp = _staging_dir(target.parent)
        try:
            write(tmp)
            write_manifest(tmp, {"format": FORMAT, f"{kind.rstrip('s')}_key": key})
            for _ in range(2):
                try:
                    os.rename(tmp, target)
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
        texts = _read_json(path / TEACHER_POOL)
        probs = load_file(path / TEACHER_PROBS)["probs"]
        if len(texts) != len(probs):  # sealed so, so written so: a bug, not damage
            raise TransferDeskError(f"{path}: {len(texts)} messages but {len(probs)} rows of probabilities")
        return TeacherRecord(texts, probs, _read_json(path / TEACHER_META), path)

    def save_teacher_labels(self, key: str, texts: list[str], probs: np.ndarray, info: dict) -> TeacherRecord:
        """One teacher's probabilities over a pool (info: its intents, in column order, and more)."""

        def write(tmp: Path) -> None:
            # JSON, not lines: a CSV or JSONL message may hold line breaks of its own.
            (tmp / TEACHER_POOL).write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8")
            save_file({"probs": np.ascontiguousarray(probs, dtype=np.float32)}, tmp / TEACHER_PROBS)
            (tmp / TEACHER_META).write_text(json.dumps(info, indent=2))

        return TeacherRecord(texts, probs, info, self._store(TEACHERS, key, write))

    def portable(self, path: str | Path | None) -> str | None:
        """`path` as this registry's files hold it (see portable_path)."""
        return portable_path(None if path is None else str(path), self.root)
