"""The model registry: self-contained, versioned, checksummed model directories.

Layout of one version, `<registry>/<name>/v<N>/`:
    encoder/            encoder + tokenizer (Hugging Face save_pretrained format)
    head.safetensors    linear head weights
    labels.json         intent names in head order
    config.yaml         the full RunConfig of the run
    model.json          backbone, source checkpoint, threshold, timings, created time
    metrics.json        test metrics (when a test file was given) and validation history
    model_card.md       a short human summary
    logs/               TensorBoard events of the run
    manifest.json       SHA-256 of every file above; checked on every load
A version is written into a staging directory and renamed into place, so a crash never
leaves a half-written version, and an existing version is never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from safetensors.torch import load_file, save_file

from transferdesk.config import RunConfig, build_config
from transferdesk.errors import TransferDeskError
from transferdesk.model import IntentClassifier, TrainedModel, select_device

MANIFEST = "manifest.json"
# Written after a version is sealed (evaluations of it), so not covered by the manifest.
UNSEALED = ("evaluations",)
VERSION_RE = re.compile(r"^v(\d+)$")


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


def version_dirs(model_dir: Path) -> list[Path]:
    """The v<N> directories of one model, oldest first."""
    found = [(int(m.group(1)), p) for p in model_dir.glob("v*") if (m := VERSION_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def _next_version(model_dir: Path) -> int:
    versions = version_dirs(model_dir)
    return int(versions[-1].name[1:]) + 1 if versions else 1


@contextmanager
def staging(registry: str | Path, name: str) -> Iterator[Path]:
    """A scratch directory inside the registry (same filesystem, so the final rename is atomic)."""
    model_dir = Path(registry) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def seal(tmp: Path, registry: str | Path, name: str) -> Path:
    """Write the manifest and move the staged files into the next free version number."""
    model_dir = Path(registry) / name
    while True:
        version = _next_version(model_dir)
        final = model_dir / f"v{version}"
        write_manifest(
            tmp,
            {"name": name, "version": version, "created": datetime.now(UTC).isoformat(timespec="seconds")},
        )
        try:
            os.rename(tmp, final)  # fails if another run took this number meanwhile
            return final
        except OSError:
            if not final.exists():
                raise


def save_weights(model: TrainedModel, root: Path) -> None:
    model.network.encoder.save_pretrained(root / "encoder")
    model.tokenizer.save_pretrained(root / "encoder")
    head = {k: v.detach().cpu().contiguous() for k, v in model.network.head.state_dict().items()}
    save_file(head, root / "head.safetensors")
    (root / "labels.json").write_text(json.dumps(model.labels, indent=2))


def model_card(cfg: RunConfig, info: dict, metrics: dict) -> str:
    test = metrics.get("test", {})
    lines = [
        f"# {cfg.name} v{info.get('version', '?')}",
        "",
        f"Intent classifier: {cfg.model.backbone} encoder ({cfg.model.pooling} pooling) "
        "+ linear head, fine-tuned with AdamW and cross-entropy.",
        "",
        f"- Target data: `{cfg.data.train}` ({info['train_examples']} examples, "
        f"{len(info['labels'])} intents)",
        f"- Source stage: {'`' + info['source'] + '`' if info.get('source') else 'none'}",
        f"- Out-of-scope threshold: {info['threshold']:.3f} (confidence below it → `{cfg.data.oos_label}`)",
        f"- Training time: {info['timings'].get('train_seconds', 0):.0f} s on {info['device']}",
    ]
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


def source_checkpoint_dir(registry: str | Path, key: str) -> Path:
    return Path(registry) / "sources" / key


def save_source_checkpoint(model: TrainedModel, target: Path, info: dict) -> Path:
    """A source-stage encoder, usable later as a backbone (`--backbone <dir>`)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        model.network.encoder.save_pretrained(tmp)
        model.tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps(info, indent=2))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "source.json").is_file():  # a concurrent run finished it first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_dir(spec: str | Path) -> Path:
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


def load_weights(root: Path, cfg: RunConfig, device: str = "auto", threshold: float = 0.0) -> TrainedModel:
    """Network, tokenizer and labels saved by save_weights (no manifest check: see load_model)."""
    from transferdesk.model import load_encoder

    labels = json.loads((root / "labels.json").read_text())
    encoder, tokenizer = load_encoder(str(root / "encoder"))
    net = IntentClassifier(encoder, len(labels), cfg.model.pooling, cfg.model.dropout)
    net.head.load_state_dict(load_file(root / "head.safetensors"))
    torch_device = select_device(device)
    net.to(torch_device).eval()
    return TrainedModel(net, tokenizer, labels, cfg.model.max_length, threshold, torch_device)


def load_model(spec: str | Path, device: str = "auto") -> tuple[TrainedModel, RunConfig, dict]:
    """Verify the manifest, then load network, tokenizer, labels and threshold."""
    root = resolve_model_dir(spec)
    manifest = verify(root)
    cfg = load_run_config(root)
    info = json.loads((root / "model.json").read_text())
    model = load_weights(root, cfg, device, info["threshold"])
    return model, cfg, {**info, "path": str(root), "version": manifest.get("version")}


def load_run_config(root: Path) -> RunConfig:
    import yaml

    return build_config(yaml.safe_load((root / "config.yaml").read_text()), str(root / "config.yaml"))


def list_versions(registry: str | Path) -> list[dict]:
    """One row per version under a registry directory, newest last."""
    registry = Path(registry)
    if not registry.is_dir():
        raise TransferDeskError(
            f"registry {registry} does not exist; train a model first "
            "or pass the registry directory (default: registry)"
        )
    rows = []
    for manifest_path in sorted(registry.glob(f"*/v*/{MANIFEST}")):
        root = manifest_path.parent
        manifest = json.loads(manifest_path.read_text())
        info = json.loads((root / "model.json").read_text()) if (root / "model.json").is_file() else {}
        metrics = json.loads((root / "metrics.json").read_text()) if (root / "metrics.json").is_file() else {}
        rows.append(
            {
                "path": str(root),
                "name": manifest.get("name"),
                "version": manifest.get("version"),
                "created": manifest.get("created"),
                "backbone": info.get("backbone"),
                "source": info.get("source") or "-",
                "intents": len(info.get("labels", [])),
                "test_accuracy": metrics.get("test", {}).get("accuracy"),
                "test_macro_f1": metrics.get("test", {}).get("macro_f1"),
            }
        )
    rows.sort(key=lambda r: (r["name"] or "", r["version"] or 0))
    return rows
