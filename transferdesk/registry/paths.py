"""Paths as registry files hold them (portable across machines), and where a version spec
(`<registry>/<name>`, `…/v<N>`) points.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transferdesk.config import RunConfig
from transferdesk.data.files import SAMPLE_PREFIX
from transferdesk.registry.manifest import ENCODER_DIR, MANIFEST, VERSION_RE

log = logging.getLogger(__name__)


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
