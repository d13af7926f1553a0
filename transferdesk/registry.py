"""The model registry: self-contained, versioned, checksummed model directories.

Layout of one version, `<registry>/<name>/v<N>/`:
    encoder/            encoder + tokenizer (Hugging Face save_pretrained format)  ┐ written by
    head.safetensors    linear head weights                                        │ the model
    classifier.json     labels, out-of-scope threshold and label, pooling, length   ┘ object
    version.json        typed metadata (VersionMeta): backbone, source, timings, …
    config.yaml         the full RunConfig of the run, paths made portable
    metrics.json        test metrics (when a test file was given), validation history, search
    model_card.md       a short human summary, titled with the version number
    test/               report.md, metrics.json, confusion.png of the test file (when given)
    search/             trial table, curves and search config (versions exported by `tune`)
    logs/               TensorBoard events of the run
    manifest.json       format, name, version, created, and SHA-256 of every file above;
                        checked on every load
    evaluations/        later `transferdesk evaluate` runs (written after sealing: not covered)
Source-stage checkpoints, `<registry>/sources/<key>/`, hold an encoder + tokenizer (a
backbone in its own right), `source.json` and their own manifest, checked before reuse.

A version is written into a staging directory and renamed into place, so a crash never
leaves a half-written version, and an existing version is never overwritten. No file holds
a machine path: files inside the registry (source checkpoints) are named relative to it,
data files and local backbones by their name, so a registry copied elsewhere describes
itself truthfully.
Versions of format 1 (before version.json) still open; their metadata is translated here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import yaml
from pydantic import Field

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
# The model object writes its encoder and tokenizer here; a version is a backbone through it.
ENCODER_DIR = "encoder"
TOKENIZER_FILE = f"{ENCODER_DIR}/tokenizer.json"
# Written after a version is sealed (evaluations of it), so not covered by the manifest.
UNSEALED = ("evaluations",)
VERSION_RE = re.compile(r"^v(\d+)$")
STAGING_PREFIX = ".staging-"


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
        update={k: portable_path(getattr(cfg.data, k)) for k in ("train", "valid", "test", "source")}
    )
    model = cfg.model.model_copy(update={"backbone": portable_path(cfg.model.backbone, registry)})
    return cfg.model_copy(update={"data": data, "model": model, "output": "registry"})


def encoder_dir(path: Path) -> Path:
    """The Hugging Face model directory inside a registry version (a version is a backbone)."""
    if (path / MANIFEST).is_file() and (path / ENCODER_DIR).is_dir():
        return path / ENCODER_DIR
    return path


def version_dirs(model_dir: Path) -> list[Path]:
    """The v<N> directories of one model, oldest first."""
    found = [(int(m.group(1)), p) for p in model_dir.glob("v*") if (m := VERSION_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_version_dir(spec: str | Path) -> Path:
    """A version directory, or a model directory meaning its newest version."""
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
    def tokenizer_sha256(self) -> str | None:
        """Equal for versions that tokenize alike (the Serve tokenizer can stay)."""
        return self.files.get(TOKENIZER_FILE)

    @property
    def encoder_dir(self) -> Path:
        return self.path / ENCODER_DIR

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

    def summary(self) -> dict:
        """Name, version, path, labels, test metrics and tokenizer digest (for APIs and lists)."""
        test = self.metrics.get("test", {})
        return {
            "name": self.name,
            "version": self.spec,
            "path": str(self.path),
            "created": self.created,
            "labels": self.labels,
            "backbone": self.meta.backbone,
            "source": self.meta.source,
            "tokenizer_sha256": self.tokenizer_sha256,
            "metrics": {k: test[k] for k in ("accuracy", "macro_f1") if k in test},
        }


def _legacy_meta(root: Path) -> VersionMeta:
    """Format 1's model.json, which held absolute source-checkpoint paths, as VersionMeta."""
    info = _read_json(root / "model.json")
    checkpoint = info.get("source_checkpoint")
    return VersionMeta(
        labels=info["labels"],
        backbone=info.get("backbone") or "unknown",
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
    meta = VersionMeta.model_validate(_read_json(root / VERSION_META)) if fmt >= 2 else _legacy_meta(root)
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


def model_card(cfg: RunConfig, version: str, meta: VersionMeta, metrics: dict, model: SavesPretrained) -> str:
    test = metrics.get("test", {})
    lines = [
        f"# {cfg.name} {version}",
        "",
        f"Intent classifier: {meta.backbone} encoder ({cfg.model.pooling} pooling) "
        "+ linear head, fine-tuned with AdamW and cross-entropy.",
        "",
        f"- Target data: `{cfg.data.train}` ({meta.train_examples} examples, {len(meta.labels)} intents)",
        f"- Source stage: {'`' + meta.source + '`' if meta.source else 'none'}",
        f"- Out-of-scope threshold: {model.threshold:.3f} (confidence below it → `{model.oos_label}`)",
        f"- Training time: {meta.timings.get('train_seconds', 0):.0f} s on {meta.device}",
    ]
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
                    found.append(_read_version(root, _read_json(root / MANIFEST)))
        return sorted(found, key=lambda v: (v.name, v.version))

    def source_checkpoint(self, key: str) -> Path | None:
        """A cached source-stage checkpoint, verified against its manifest; a damaged or
        unsealed one is set aside (and so trained again) rather than reused."""
        path = self.root / SOURCES / key
        if not path.exists():
            return None
        try:
            verify(path)
            return path
        except TransferDeskError as err:
            aside = path.with_name(f".damaged-{key}-{int(time.time())}")
            log.warning(
                "source checkpoint %s is not reused (%s); moved to %s, training it again", key, err, aside
            )
            os.rename(path, aside)
            return None

    def save_source(self, model: Any, key: str, info: dict) -> Path:
        """A source-stage encoder, usable later as a backbone (`--backbone <dir>`)."""
        target = self.root / SOURCES / key
        tmp = _staging_dir(target.parent)
        try:
            model.save_encoder(tmp)
            (tmp / SOURCE_META).write_text(json.dumps(info, indent=2))
            write_manifest(tmp, {"format": FORMAT, "source_key": key})
            try:
                os.rename(tmp, target)
            except OSError:
                if self.source_checkpoint(key) is None:  # not a concurrent run that finished first
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def portable(self, path: str | Path | None) -> str | None:
        """`path` as this registry's files hold it (see portable_path)."""
        return portable_path(None if path is None else str(path), self.root)
