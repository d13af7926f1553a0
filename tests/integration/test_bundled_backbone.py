"""End-to-end runs of the real bundled all-MiniLM-L6-v2 on the bundled sample data."""

import json
import shutil
from pathlib import Path

import pytest

from transferdesk.cli.main import main
from transferdesk.errors import TransferDeskError
from transferdesk.model.modeling import IntentModel
from transferdesk.registry import Registry, open_version, verify

pytestmark = pytest.mark.integration

# Short schedules: enough to show learning well above chance within the suite's time budget.
FAST = ["--training.epochs", "4", "--runtime.progress", "false"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bundled") / "registry"


@pytest.fixture(scope="module")
def sample_model(registry: Path) -> Path:
    """`transferdesk train` with no data flags: the bundled sample, default backbone."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "transferdesk", "train", "--output", str(registry), *FAST],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(proc.stdout.strip().splitlines()[-1])


def test_train_evaluate_predict_beats_chance(sample_model: Path, capsys) -> None:
    metrics = open_version(sample_model).metrics
    assert metrics["accuracy"] > 0.6  # 20 intents + out-of-scope: chance is under 5%
    assert metrics["test"]["oos_auroc"] > 0.6
    assert main(["evaluate", str(sample_model), "--data", "sample:retail/test.csv"]) == 0
    evaluated = json.loads(Path(capsys.readouterr().out.strip().splitlines()[-1]).read_text())
    assert evaluated["accuracy"] == pytest.approx(metrics["accuracy"])
    assert main(["predict", str(sample_model), "where is my parcel? it was due monday", "--json"]) == 0
    [answer] = json.loads(capsys.readouterr().out)
    # Its best guess (a 4-epoch model may still hand this one to a human: the threshold decides).
    assert answer["top"][0]["intent"] in ("track_order", "delivery_delayed")


def test_tampered_real_model_is_refused(sample_model: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(sample_model, tmp_path / "v1")
    config = copy / "encoder" / "config.json"
    config.write_text(config.read_text().replace('"hidden_act": "gelu"', '"hidden_act": "relu"'))
    with pytest.raises(TransferDeskError, match=r"altered: encoder/config\.json"):
        IntentModel.from_pretrained(copy)
    assert main(["predict", str(copy), "hello"]) == 2


def test_source_stage_then_target_stage(registry: Path, capsys) -> None:
    args = [
        "train",
        "--source",
        "sample:customer_service/train.csv",
        "--output",
        str(registry),
        "--name",
        "with-source",
        "--source_training.epochs",
        "1",
        *FAST,
    ]
    assert main(args) == 0
    version = open_version(capsys.readouterr().out.strip().splitlines()[-1])
    checkpoint = registry / version.meta.source_checkpoint  # relative to the registry
    assert verify(checkpoint) and version.meta.source == "sample:customer_service/train.csv"
    assert version.metrics["accuracy"] > 0.6
    assert [v.spec for v in Registry(registry).versions("with-source")] == ["with-source/v1"]
    model = IntentModel.from_pretrained(registry / "with-source")  # newest version
    assert len(model.labels) == 20
    # The source checkpoint is a backbone in its own right.
    reused = IntentModel.from_backbone(str(checkpoint), ["a", "b"], version.config.model)
    assert reused.network.encoder.config.hidden_size == 384


def test_self_training_on_the_bundled_pool(registry: Path, capsys) -> None:
    """The sample's unlabelled retail pool end to end: contrastive pre-training on it, teacher,
    pseudo-labels, student."""
    args = ["train", "--data.unlabelled", "sample:retail/unlabelled.txt", "--output", str(registry)]
    args += ["--name", "with-pool", "--semi_supervised.student_epochs", "2", *FAST]
    args += ["--set", "contrastive.epochs=1"]
    assert main(args) == 0
    version = open_version(capsys.readouterr().out.strip().splitlines()[-1])
    record = version.metrics["semi_supervised"]
    assert record["pool"]["file"] == "sample:retail/unlabelled.txt" and record["pool"]["rows_used"] == 140
    assert record["rounds"][0]["pseudo_labels"] > 100  # most of the pool is confidently in scope
    assert version.metrics["accuracy"] > 0.6
    assert "Unlabelled pool: `sample:retail/unlabelled.txt`" in version.card
    assert record["contrastive_encoder"].startswith("sources/") and "contrastive pre-training" in version.card
    assert record["teachers"][0]["backbone"] == record["contrastive_encoder"]
    assert len(IntentModel.from_pretrained(version).labels) == 20  # the student: the same shape
