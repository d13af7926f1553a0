import ast
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import make_tiny_backbone, toy_rows, write_csv
from transferdesk import registry as registry_module
from transferdesk.config import RunConfig, load_config
from transferdesk.errors import TransferDeskError
from transferdesk.model.modeling import IntentModel
from transferdesk.registry import ModelVersion, Registry, open_version, resolve_version_dir, verify
from transferdesk.registry.versions import current_settings
from transferdesk.training.train import train_and_register

ROOT = Path(__file__).resolve().parents[1]


def _config(root: Path, **overrides: object) -> RunConfig:
    return load_config(
        None,
        {
            "output": str(root / "registry"),
            "model.backbone": str(root / "bb"),
            "data.train": str(write_csv(root / "train.csv", toy_rows(0, 4))),
            "data.valid": str(write_csv(root / "valid.csv", [*toy_rows(4, 6), ("weather today", "oos")])),
            "data.test": str(write_csv(root / "test.csv", [*toy_rows(6, 8), ("oos weather", "oos")])),
            "training.epochs": 2,
            "runtime.progress": False,
            "runtime.num_threads": 1,
            **overrides,
        },
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reg")
    make_tiny_backbone(root / "bb")
    return root


@pytest.fixture(scope="module")
def registered(workdir: Path) -> ModelVersion:
    """One tiny model trained and published, shared by the tests of this module."""
    return train_and_register(_config(workdir))


def test_version_directory_is_complete(registered: ModelVersion) -> None:
    root = registered.path
    assert root.name == "v1" and registered.spec == "intent-classifier/v1" and registered.format == 2
    for name in (
        "encoder/config.json",
        "encoder/model.safetensors",
        "encoder/tokenizer.json",
        "head.safetensors",
        "classifier.json",
        "version.json",
        "config.yaml",
        "metrics.json",
        "model_card.md",
        "manifest.json",
        "test/confusion.png",
        "test/report.md",
    ):
        assert (root / name).is_file(), name
    assert list((root / "logs").glob("events.out.tfevents.*"))
    assert "head.safetensors" in verify(root)["files"] and len(registered.files) >= 12
    assert {"accuracy", "macro_f1", "test", "valid_history", "train_seconds"} <= registered.metrics.keys()
    assert "oos_recall" in registered.metrics["test"] and "oos_auroc" in registered.metrics["test"]
    assert registered.labels == ["refund_status", "reset_password", "track_order"]
    assert registered.tokenizer_sha256 == registered.files["encoder/tokenizer.json"]


def test_card_is_titled_with_the_version_number(registered: ModelVersion) -> None:
    assert registered.card.splitlines()[0] == "# intent-classifier v1"
    timing = f"Training time: {registered.meta.timings['train_seconds']:.0f} s on {registered.meta.device}"
    assert timing in registered.card


def test_no_metadata_file_holds_a_machine_path(registered: ModelVersion, workdir: Path) -> None:
    texts = {
        p: p.read_text(encoding="utf-8")
        for p in registered.path.rglob("*")
        if p.suffix in (".json", ".yaml", ".md", ".txt")
    }
    assert len(texts) >= 8
    for path, text in texts.items():
        assert str(workdir) not in text, path
    strings = []

    def collect(node: object) -> None:
        if isinstance(node, str):
            strings.append(node)
        elif isinstance(node, dict):
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    for path, text in texts.items():
        if path.suffix == ".json":
            collect(json.loads(text))
        elif path.suffix == ".yaml":
            collect(yaml.safe_load(text))
    assert strings and not [s for s in strings if s.startswith("/")]


def test_a_copied_version_loads_and_describes_itself_the_same(
    registered: ModelVersion, tmp_path: Path
) -> None:
    copy = shutil.copytree(registered.path.parent.parent, tmp_path / "elsewhere" / "registry")
    registered.path.parent.parent.rename(registered.path.parent.parent.with_name("registry-moved"))
    try:
        moved = open_version(copy / "intent-classifier" / "v1")
        assert (moved.spec, moved.created, moved.meta, moved.metrics) == (
            registered.spec,
            registered.created,
            registered.meta,
            registered.metrics,
        )
        texts = ["where is my parcel", "forgot my password"]
        original = IntentModel.from_pretrained(
            registered.path.parent.parent.with_name("registry-moved") / "intent-classifier/v1"
        )
        assert np.array_equal(
            IntentModel.from_pretrained(moved).predict_proba(texts), original.predict_proba(texts)
        )
    finally:
        registered.path.parent.parent.with_name("registry-moved").rename(registered.path.parent.parent)


def test_loaded_model_predicts_like_the_trained_one(registered: ModelVersion) -> None:
    model = IntentModel.from_pretrained(registered.path)
    assert model.labels == registered.labels and model.oos_label == "oos"
    probs = model.predict_proba(["where is my parcel", "forgot my password"])
    again = IntentModel.from_pretrained(registered.path.parent)  # the model directory: its newest
    assert np.allclose(probs, again.predict_proba(["where is my parcel", "forgot my password"]), atol=1e-6)
    assert isinstance(registered.config, RunConfig) and registered.config.training.epochs == 2


def test_new_runs_get_new_versions_and_never_overwrite(registered: ModelVersion, workdir: Path) -> None:
    before = sorted(p.name for p in registered.path.parent.iterdir())
    second = train_and_register(_config(workdir, **{"training.epochs": 1}))
    assert second.path.name == "v2" and verify(registered.path)
    assert second.card.startswith("# intent-classifier v2\n")
    assert resolve_version_dir(registered.path.parent) == second.path
    assert [v.version for v in Registry(workdir / "registry").versions()] == [1, 2]
    assert not [p for p in registered.path.parent.iterdir() if p.name.startswith(".staging")]
    assert set(before) < {p.name for p in registered.path.parent.iterdir()}


@pytest.mark.parametrize("damage", ["alter", "delete"])
def test_tampered_models_are_refused(registered: ModelVersion, tmp_path: Path, damage: str) -> None:
    copy = shutil.copytree(registered.path, tmp_path / "v1")
    if damage == "alter":
        with open(copy / "head.safetensors", "r+b") as f:
            f.seek(-4, 2)
            f.write(b"\x00\x01\x02\x03")
        expected = "altered: head.safetensors"
    else:
        (copy / "classifier.json").unlink()
        expected = "missing: classifier.json"
    with pytest.raises(TransferDeskError, match=expected):
        IntentModel.from_pretrained(copy)


def test_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(TransferDeskError, match="not found"):
        open_version(tmp_path / "nothing")
    with pytest.raises(TransferDeskError, match="holds no model version"):
        IntentModel.from_pretrained(tmp_path)
    with pytest.raises(TransferDeskError, match="does not exist"):
        Registry(tmp_path / "nothing").versions()


RELEASED = Path(__file__).parent / "fixtures" / "released"


def test_a_version_published_by_0_1_0_still_loads_and_answers_the_same(tmp_path: Path) -> None:
    """tests/fixtures/released/ was published (and promoted) by TransferDesk 0.1.0 at commit
    0448ae0, before the core was laid out by concern; expected.json holds its answers then."""
    registry = shutil.copytree(RELEASED, tmp_path / "released")
    expected = json.loads((registry / "expected.json").read_text())
    version = open_version(f"{registry}/published-0.1.0@production")
    assert version.format == 2 and version.labels == expected["labels"]
    model = IntentModel.from_pretrained(version)
    assert model.threshold == expected["threshold"]
    assert np.allclose(model.predict_logits(expected["texts"]), expected["logits"], atol=1e-6)
    assert Registry(registry).stages("published-0.1.0")["production"].version == 1
    # Its config.yaml names settings that have moved since (contrastive_*, joint's).
    assert version.config.contrastive.batch_size == 64 and version.config.methods() == ["finetune"]


def test_settings_published_where_they_used_to_live_read_as_today() -> None:
    published = {
        "data": {"source": "clinc.csv"},
        "source_training": {"epochs": 1, "mode": "joint", "weight": 0.9, "keep_head": True},
        "semi_supervised": {"contrastive_epochs": 2, "contrastive_temperature": 0.1},
    }
    cfg = current_settings(published, "config.yaml")
    assert cfg.methods() == ["joint", "finetune"] and cfg.source_training.epochs == 1
    assert (cfg.joint.weight, cfg.joint.keep_head) == (0.9, True)
    assert (cfg.contrastive.epochs, cfg.contrastive.temperature) == (2, 0.1)
    sequential = {"data": {"source": "c.csv"}, "source_training": {"mode": "sequential"}}
    assert current_settings(sequential, "config.yaml").methods() == ["source", "finetune"]


def test_a_version_of_format_1_is_refused_with_a_message(registered: ModelVersion, tmp_path: Path) -> None:
    old = shutil.copytree(registered.path, tmp_path / "old" / "v1")
    manifest = json.loads((old / "manifest.json").read_text())
    registry_module.write_manifest(old, {k: manifest[k] for k in ("name", "version", "created")})
    with pytest.raises(TransferDeskError, match=r"format 1.*train it again"):
        open_version(old)


def test_threshold_applies_only_to_data_with_out_of_scope_rows(registered: ModelVersion) -> None:
    from transferdesk.data import Dataset
    from transferdesk.evaluation.metrics import evaluate

    model = IntentModel.from_pretrained(registered)
    model.threshold = float("inf")  # every message is below it
    in_scope = Dataset(["where is my parcel", "forgot my password"], ["track_order", "reset_password"])
    plain = evaluate(model, in_scope, progress=False)
    assert plain["below_threshold"] == 1.0 and "oos" not in plain["predictions"]
    mixed = Dataset([*in_scope.texts, "weather today"], [*in_scope.labels, "oos"])
    scored = evaluate(model, mixed, progress=False)
    assert scored["predictions"] == ["oos"] * 3 and scored["oos_recall"] == 1.0
    assert scored["in_scope_accuracy"] == 0.0


def test_a_damaged_source_checkpoint_is_trained_again(workdir: Path) -> None:
    from transferdesk.training.train import run_training

    cfg = _config(workdir, **{"data.source": str(workdir / "train.csv"), "source_training.epochs": 1})
    first = run_training(cfg).source_checkpoint
    assert first is not None and verify(first)
    weights = first / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\x00" * 8)
    second = run_training(cfg).source_checkpoint
    assert second == first and verify(second)  # retrained into the same place, sealed again
    assert list(first.parent.glob(f".damaged-{first.name}-*"))  # the damaged one kept aside
    # One without a manifest (unsealed: a crash mid-write, or a copy by hand) is not trusted.
    (first / "manifest.json").unlink()
    assert run_training(cfg).source_checkpoint == first and verify(first)
    assert len(list(first.parent.glob(f".damaged-{first.name}-*"))) == 2


REGISTRY_FILES = (
    "manifest.json",
    "version.json",
    "metrics.json",
    "model_card.md",
    "config.yaml",
    "source.json",
)


def test_no_module_outside_the_registry_names_its_files() -> None:
    """The registry owns its on-disk format: no other module spells one of its file names."""
    offenders = []
    for path in sorted(ROOT.glob("*/**/*.py")):
        if path.parts[len(ROOT.parts)] not in ("transferdesk", "tuning", "deployments", "benchmarks"):
            continue
        # The registry; and evaluation, whose report files (metrics.json among them) a version's
        # test/ holds as evaluation writes them.
        if (
            path.parent == ROOT / "transferdesk" / "registry"
            or path == ROOT / "transferdesk" / "evaluation" / "report.py"
        ):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                # A file name as a path is spelt (help texts may mention one in a sentence).
                offenders += [
                    f"{path.relative_to(ROOT)}: {name}"
                    for name in REGISTRY_FILES
                    if node.value == name or node.value.endswith(f"/{name}")
                ]
    assert not offenders


def test_stages_pin_versions_and_keep_their_history(registered: ModelVersion, workdir: Path) -> None:
    registry = Registry(workdir / "registry")
    while len(registry.versions("intent-classifier")) < 3:
        train_and_register(_config(workdir, **{"training.epochs": 1}))
    model_dir = workdir / "registry" / "intent-classifier"
    first = registry.promote(model_dir / "v1", "production", "ana", "first release")
    assert (first.version, first.previous) == (1, None)
    registry.promote(model_dir / "v2", "production", "bo", "better on payments")
    registry.promote(model_dir / "v3", "canary", "bo", "try v3 on 10%")
    assert resolve_version_dir(f"{model_dir}@production") == model_dir / "v2"
    assert open_version(f"{model_dir}@canary").version == 3
    assert IntentModel.from_pretrained(f"{model_dir}@production").labels == registry.versions()[0].labels
    back = registry.rollback("intent-classifier", "production", "ana", "v2 misroutes refunds")
    assert (back.version, back.previous, back.action) == (1, 2, "rollback")
    assert open_version(f"{model_dir}@production").version == 1
    with pytest.raises(TransferDeskError, match="no earlier version"):
        registry.rollback("intent-classifier", "production", "ana", "again")
    log = registry.stage_log("intent-classifier")
    assert [(e.action, e.stage, e.version, e.by) for e in log] == [
        ("promote", "production", 1, "ana"),
        ("promote", "production", 2, "bo"),
        ("promote", "canary", 3, "bo"),
        ("rollback", "production", 1, "ana"),
    ]
    assert log[-1].reason == "v2 misroutes refunds" and log[-1].at
    with pytest.raises(TransferDeskError, match="no 'staging' stage"):
        open_version(f"{model_dir}@staging")
    with pytest.raises(TransferDeskError, match="lower-case"):
        registry.promote(model_dir / "v1", "Prod!", "ana", "x")


def test_a_stage_refuses_a_version_replaced_after_its_promotion(
    registered: ModelVersion, workdir: Path, tmp_path: Path
) -> None:
    while len(Registry(workdir / "registry").versions("intent-classifier")) < 2:
        train_and_register(_config(workdir, **{"training.epochs": 1}))
    copy = shutil.copytree(workdir / "registry", tmp_path / "registry")
    registry = Registry(copy)
    registry.promote(copy / "intent-classifier" / "v1", "production", "ana", "release")
    v1 = copy / "intent-classifier" / "v1"
    card = v1 / "model_card.md"
    card.write_text(card.read_text() + "edited\n")
    registry_module.write_manifest(v1, {"format": 2, "name": "intent-classifier", "version": 1})  # re-sealed
    with pytest.raises(TransferDeskError, match="not the one promoted"):
        open_version(f"{copy / 'intent-classifier'}@production")
    head = copy / "intent-classifier" / "v2" / "head.safetensors"
    head.write_bytes(head.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    with pytest.raises(TransferDeskError, match=r"altered: head\.safetensors"):  # never promoted
        registry.promote(copy / "intent-classifier" / "v2", "production", "ana", "damaged")
