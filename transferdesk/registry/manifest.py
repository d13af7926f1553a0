"""The registry's on-disk format: file and folder names, manifests of SHA-256 digests, and
staging directories renamed into place, so a crash never leaves half a version.

A manifest seals a directory: `verify` refuses one whose listed files are missing or altered,
that holds files the manifest does not list (outside the unsealed folders, which are sealed by
manifests of their own), or whose manifest names a path outside it (absolute, with `..`, or
through a symbolic link that leads out). `move_into_place` makes what it renames durable: every
file and folder is fsynced before the rename, and the parent folder after it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

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
    """The manifest, after checking every file it lists exists unchanged, that it lists only
    paths inside `root`, and that `root` holds no file it does not list (the unsealed folders
    aside)."""
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise TransferDeskError(
            f"{root} is not a registry model (no {MANIFEST}); point at a version directory "
            "such as registry/intent-classifier/v1 (see `transferdesk models list`)"
        )
    real = root.resolve()  # an export is reached through a link (exports/onnx): check its target
    manifest = json.loads(manifest_path.read_text())
    listed = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(listed, dict) or not all(isinstance(d, str) for d in listed.values()):
        raise TransferDeskError(f"refusing to load {root}: its {MANIFEST} holds no list of files and digests")
    if outside := [f for f in listed if not _inside(real, f)]:
        named = ", ".join(map(repr, outside))
        raise TransferDeskError(
            f"refusing to load {root}: its {MANIFEST} names files outside it ({named}); "
            "a manifest lists relative paths inside its own directory only. The model was tampered "
            "with; restore it from a copy or train it again"
        )
    unlisted = [f for f in _present(real) if f not in listed]
    missing = [f for f in listed if not (root / f).is_file()]
    altered = [f for f, digest in listed.items() if f not in missing and sha256(root / f) != digest]
    if missing or altered or unlisted:
        details = "; ".join(
            part
            for part in (
                f"missing: {', '.join(missing)}" if missing else "",
                f"altered: {', '.join(altered)}" if altered else "",
                f"not in the manifest: {', '.join(unlisted)}" if unlisted else "",
            )
            if part
        )
        raise TransferDeskError(
            f"refusing to load {root}: its files do not match its manifest ({details}). "
            "The model was changed or damaged after it was saved; restore it from a copy "
            "or train it again"
        )
    return manifest


def _inside(real_root: Path, name: str) -> bool:
    """Whether a manifest's name is a relative path that stays inside the directory, links
    followed (a link to a file inside is allowed)."""
    path = PurePosixPath(name)
    if not name or "\\" in name or path.is_absolute() or ".." in path.parts or name != path.as_posix():
        return False
    return (real_root / path).resolve().is_relative_to(real_root)


def _present(real_root: Path) -> list[str]:
    """Every entry under a directory that is not a folder (files, links, anything else; a link
    to a folder counts as an entry, not followed), as a manifest names it, the manifest itself
    and the unsealed folders aside."""
    found = []
    for folder, dirs, files in os.walk(real_root):
        here = Path(folder).relative_to(real_root)
        if here == Path("."):
            dirs[:] = [d for d in dirs if d not in UNSEALED or os.path.islink(os.path.join(folder, d))]
            files = [f for f in files if f != MANIFEST]
        links = [d for d in dirs if os.path.islink(os.path.join(folder, d))]
        dirs[:] = [d for d in dirs if d not in links]
        found += [(here / name).as_posix() for name in (*files, *links)]
    return sorted(found)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def staging_dir(parent: Path) -> Path:
    """A scratch directory beside its destination (same filesystem: the final rename is atomic);
    folders made for it are made durably (see move_into_place)."""
    missing = [p for p in (parent, *parent.parents) if not p.exists()]
    parent.mkdir(parents=True, exist_ok=True)
    for made in reversed(missing):
        fsync_dir(made.parent)
    return Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=parent))


def move_into_place(staged: Path, final: Path) -> None:
    """Rename a sealed staging directory to `final` durably: every file under it fsynced, then
    its folders (the staging folder last), then the rename, then the parent folder, so that
    after a crash the directory is either absent or complete on disk. Fails as `os.rename`
    does (onto a non-empty directory: an existing version or export is never overwritten)."""
    fsync_tree(staged)
    os.rename(staged, final)
    fsync_dir(final.parent)


def fsync_tree(root: Path) -> None:
    """fsync every regular file under `root` (links not followed), then each folder, deepest
    first, `root` last."""
    folders = []
    for folder, _, files in os.walk(root):
        folders.append(folder)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                _fsync(path, os.O_RDONLY)
    for folder in reversed(folders):  # os.walk lists a folder before those inside it
        fsync_dir(Path(folder))


def fsync_dir(path: Path) -> None:
    """fsync a folder, which makes the names it holds (a rename into it) durable. Filesystems
    that cannot (some network ones) are let be."""
    try:
        _fsync(str(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as err:
        log.debug("cannot fsync folder %s: %s", path, err)


def _fsync(path: str, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
