"""The registry seals against tampering, not only damage (issue #37, items 3 and 7): files a
manifest does not list, paths outside the sealed directory, export.json naming files not its
own, pickled encoder weights, durability of what is renamed into place, `export --replace`
swapping atomically, and `runtime: auto` refusing a damaged export.

Built on a copy of tests/fixtures/released/ (a version published by 0.1.0): nothing trains."""

import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import transferdesk.registry.manifest as manifest_module
from transferdesk.errors import TransferDeskError
from transferdesk.model.modeling import IntentModel
from transferdesk.model.runtime import choose_runtime
from transferdesk.registry import (
    ExportMeta,
    ModelVersion,
    Registry,
    RuntimeCheck,
    open_version,
    save_export,
    verify,
    write_manifest,
)

RELEASED = Path(__file__).parent / "fixtures" / "released"
INT8 = "model-int8.onnx"


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    """A copy of the released version (its registry copied with it)."""
    return shutil.copytree(RELEASED, tmp_path / "released") / "published-0.1.0" / "v1"


def _reseal(root: Path) -> None:
    """Seal a directory anew, as someone who can write the registry can (what a manifest alone
    cannot stop: it is the format and the paths that must hold)."""
    manifest = json.loads((root / "manifest.json").read_text())
    write_manifest(root, {k: v for k, v in manifest.items() if k != "files"})


def _list(root: Path, name: str, content: Path) -> None:
    """Add `name` to a manifest with the digest of `content`."""
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"][name] = manifest_module.sha256(content)
    (root / "manifest.json").write_text(json.dumps(manifest))


def _meta(version: ModelVersion, created: str = "2026-01-01T00:00:00+00:00") -> ExportMeta:
    check = RuntimeCheck(
        file=INT8,
        argmax_agreement=1.0,
        max_prob_diff=0.0,
        accuracy=1.0,
        torch_accuracy=1.0,
        accuracy_drop_points=0.0,
        size_mb=0.0,
    )
    return ExportMeta(
        parent=version.spec,
        parent_manifest_sha256=version.manifest_sha256,
        created=created,
        opset=18,
        exporter={},
        validation="valid.csv",
        validation_rows=1,
        max_accuracy_drop_points=0.5,
        runtimes={"onnx-int8": check},
    )


def _writer(content: bytes) -> Callable[[Path], None]:
    """Stands in for the exporter: the registry's side of an export does not read the graph."""
    return lambda target: (target / INT8).write_bytes(content)


def _export(v1: Path, content: bytes = b"graph one", replace: bool = False) -> ModelVersion:
    version = open_version(v1)
    save_export(version, _writer(content), _meta(version, content.decode()), replace)
    return version


# 1. A manifest checks tampering, not only damage.


@pytest.mark.parametrize("name", ["encoder/custom_code.py", "encoder/pytorch_model.bin", "notes/x.txt"])
def test_a_file_the_manifest_does_not_list_is_refused(v1: Path, name: str) -> None:
    (v1 / name).parent.mkdir(exist_ok=True)
    (v1 / name).write_text("import os\n")
    with pytest.raises(TransferDeskError, match=rf"not in the manifest: {name}\b"):
        open_version(v1)


def test_a_version_opened_earlier_is_verified_again_when_its_model_is_loaded(v1: Path) -> None:
    from transferdesk.model.modeling import IntentModel

    version = open_version(v1)  # verified now; the weights are read later
    head = v1 / "head.safetensors"
    head.write_bytes(head.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    with pytest.raises(TransferDeskError, match=r"head\.safetensors"):
        IntentModel.from_pretrained(version)


def test_a_link_the_manifest_does_not_list_is_refused(v1: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (v1 / "encoder" / "extra").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(TransferDeskError, match=r"not in the manifest: encoder/extra\b"):
        open_version(v1)


def test_the_unsealed_folders_are_left_to_their_own_manifests(v1: Path) -> None:
    (v1 / "evaluations" / "test-1").mkdir(parents=True)
    (v1 / "evaluations" / "test-1" / "metrics.json").write_text("{}")
    (v1 / "exports" / "stray").mkdir(parents=True)
    assert open_version(v1).spec == "published-0.1.0/v1"


@pytest.mark.parametrize("where", ["absolute", "dotdot", "link-out"])
def test_a_manifest_naming_files_outside_its_directory_is_refused(
    v1: Path, tmp_path: Path, where: str
) -> None:
    outside = tmp_path / "outside.json"
    outside.write_text('{"planted": true}')
    if where == "absolute":
        name = str(outside)
        _list(v1, name, outside)
    elif where == "dotdot":
        name = "../../../outside.json"
        assert (v1 / name).resolve() == outside.resolve()
        _list(v1, name, outside)
    else:  # a listed file that is a link leading out, with the digest of what it leads to
        name = "encoder/tokenizer.json"
        shutil.copy(v1 / name, outside)
        (v1 / name).unlink()
        (v1 / name).symlink_to(outside)
    with pytest.raises(TransferDeskError, match=re.escape(f"names files outside it ('{name}')")):
        open_version(v1)


def test_a_cache_entry_holding_an_unlisted_file_is_not_reused(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    stored = registry.save_teacher_labels(
        "k", ["a", "b"], np.eye(2, dtype=np.float32), {"intents": ["x", "y"]}
    )
    assert registry.teacher_labels("k") is not None
    (stored.path / "planted.py").write_text("import os\n")
    assert registry.teacher_labels("k") is None  # set aside: computed again
    assert list(stored.path.parent.glob(".damaged-k-*"))


def test_an_export_holding_an_unlisted_file_is_refused(v1: Path) -> None:
    version = _export(v1)
    (v1 / "exports" / "onnx" / "model.onnx").write_bytes(b"planted")
    with pytest.raises(TransferDeskError, match=r"not in the manifest: model\.onnx"):
        version.open_export()


# 2. export.json names only the export's own files.


@pytest.mark.parametrize("file", ["absolute", "../../head.safetensors", "model.onnx", "manifest.json"])
def test_export_json_naming_a_file_not_its_own_is_refused(v1: Path, file: str) -> None:
    version = _export(v1)
    root = v1 / "exports" / "onnx"
    if file == "absolute":
        file = str(v1 / "head.safetensors")
    meta = json.loads((root / "export.json").read_text())
    meta["runtimes"]["onnx-int8"]["file"] = file
    (root / "export.json").write_text(json.dumps(meta))
    manifest = json.loads((root / "manifest.json").read_text())
    write_manifest(root, {k: v for k, v in manifest.items() if k != "files"})  # sealed anew
    with pytest.raises(TransferDeskError, match=re.escape(f"names '{file}' as the onnx-int8 runtime's file")):
        version.open_export()


# 3. Models load with safetensors only.


def _pickle_encoder(v1: Path, keep_safetensors: bool, name: str = "pytorch_model.bin") -> None:
    weights = v1 / "encoder" / "model.safetensors"
    torch.save(load_file(weights), v1 / "encoder" / name)
    if not keep_safetensors:
        weights.unlink()


def test_an_encoder_with_pickled_weights_only_is_refused(v1: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _pickle_encoder(v1, keep_safetensors=False)
    _reseal(v1)  # only the format is wrong: the manifest matches
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was read"))
    with pytest.raises(
        TransferDeskError, match=r"no model\.safetensors, only pytorch_model\.bin.*safetensors format only"
    ):
        IntentModel.from_pretrained(v1, "cpu")


def test_an_encoder_config_naming_pickled_weights_is_refused(
    v1: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _pickle_encoder(v1, keep_safetensors=True, name="adapter_model.bin")
    config = json.loads((v1 / "encoder" / "config.json").read_text())
    (v1 / "encoder" / "config.json").write_text(
        json.dumps({**config, "transformers_weights": "adapter_model.bin"})
    )
    _reseal(v1)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was read"))
    with pytest.raises(TransferDeskError, match=r"names 'adapter_model\.bin' as its weights"):
        IntentModel.from_pretrained(v1, "cpu")


# 4. Durability: files, then the staging folder, fsynced before the rename; the parent after.


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """fsyncs (by the path of the descriptor) and renames, in the order they happen."""
    seen: list[tuple[str, ...]] = []
    fsync, rename = os.fsync, os.rename

    def record_fsync(fd: int) -> None:
        seen.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def record_rename(src: str | Path, dst: str | Path) -> None:
        rename(src, dst)
        seen.append(("rename", str(src), str(dst)))

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "rename", record_rename)
    return seen


def _assert_durable(events: list[tuple[str, ...]], final: Path) -> None:
    """Every file of `final` and its folders fsynced (files first, the staging folder last)
    before it was renamed to `final`, and `final`'s parent fsynced after."""
    final = final.resolve()
    (at,) = [i for i, e in enumerate(events) if e[0] == "rename" and Path(e[2]).resolve() == final]
    staged = Path(events[at][1]).resolve()
    synced = [Path(e[1]) for e in events[:at] if e[0] == "fsync"]
    files = [staged / p.relative_to(final) for p in final.rglob("*") if p.is_file()]
    assert files and all(f in synced for f in files), "a file was renamed into place unsynced"
    assert staged in synced and max(synced.index(f) for f in files) < synced.index(staged)
    folders = [staged / p.relative_to(final) for p in final.rglob("*") if p.is_dir()]
    assert all(synced.index(d) < synced.index(staged) for d in folders)
    assert ("fsync", str(final.parent)) in events[at + 1 :], (
        "the parent folder was not synced after the rename"
    )


def test_a_published_version_is_durable(v1: Path, tmp_path: Path, events: list) -> None:
    version = open_version(v1)
    model = IntentModel.from_pretrained(version, "cpu")
    with Registry(tmp_path / "registry").draft("durable") as draft:
        published = draft.publish(model, version.config, version.meta, version.metrics)
    _assert_durable(events, published.path)


def test_an_export_is_durable(v1: Path, events: list) -> None:
    _export(v1)
    _assert_durable(events, (v1 / "exports" / "onnx").resolve())
    assert events[-1] == ("fsync", str((v1 / "exports").resolve()))  # the link to it, too


def test_a_cache_entry_is_durable(tmp_path: Path, events: list) -> None:
    stored = Registry(tmp_path / "registry").save_teacher_labels("k", ["a"], np.ones((1, 1)), {})
    _assert_durable(events, stored.path)


# 5. `export --replace` swaps atomically.


def test_replacing_an_export_never_leaves_a_reader_without_one(
    v1: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    version = _export(v1, b"graph one")
    # Every rename takes a while: a reader gets every chance to fall between two of them.
    for name in ("rename", "replace"):
        real = getattr(os, name)

        def slow(src: str | Path, dst: str | Path, real: Callable = real) -> None:
            real(src, dst)
            time.sleep(0.05)

        monkeypatch.setattr(os, name, slow)
    seen: list[str] = []
    failures: list[str] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                export = version.open_export()
                seen.append(export.meta.created)
            except (TransferDeskError, OSError) as err:
                failures.append(str(err))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        time.sleep(0.05)
        save_export(version, _writer(b"graph two"), _meta(version, "graph two"), replace=True)
        time.sleep(0.05)
    finally:
        done.set()
        reader.join()
    assert not failures, failures[:3]
    assert seen[0] == "graph one" and seen[-1] == "graph two"
    assert (v1 / "exports" / "onnx" / INT8).read_bytes() == b"graph two"
    left = sorted(p.name for p in (v1 / "exports").iterdir())
    assert left[-1] == "onnx" and len(left) == 2, left  # the link and its folder: the old one removed


def test_an_export_made_before_the_link_opens_and_is_replaced(v1: Path) -> None:
    version = _export(v1, b"graph one")
    link = v1 / "exports" / "onnx"
    held = link.resolve()
    link.unlink()
    held.rename(link)  # as exports were laid out before: a folder in place
    assert version.open_export().meta.created == "graph one" and verify(v1)
    save_export(version, _writer(b"graph two"), _meta(version, "graph two"), replace=True)
    assert version.open_export().meta.created == "graph two" and link.is_symlink()
    assert len(list((v1 / "exports").iterdir())) == 2
    with pytest.raises(TransferDeskError, match="already has an ONNX export"):
        save_export(version, _writer(b"graph three"), _meta(version, "graph three"), replace=False)
    assert version.open_export().meta.created == "graph two"
    assert len(list((v1 / "exports").iterdir())) == 2  # the refused one not left behind


# 6. A damaged export under runtime auto refuses to start; torch named explicitly still serves.


def test_auto_refuses_a_damaged_export_and_names_both_fixes(v1: Path) -> None:
    assert choose_runtime(open_version(v1), "auto", "cpu") == "torch"  # no export: torch, as before
    version = _export(v1)
    assert choose_runtime(version, "auto", "cpu") == "onnx-int8"
    (v1 / "exports" / "onnx" / INT8).write_bytes(b"graph altered")
    with pytest.raises(TransferDeskError) as refused:
        choose_runtime(version, "auto", "cpu")
    message = str(refused.value)
    assert "altered: model-int8.onnx" in message
    assert f"transferdesk export {v1} --replace true" in message and "runtime: torch" in message
    assert choose_runtime(version, "torch", "cpu") == "torch"
    assert choose_runtime(version, "auto", "cuda") == "torch"  # on a GPU auto is torch anyway
