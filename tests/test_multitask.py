"""Several tasks in one model: a head per task over one shared encoder, trained jointly; rows
without a task's label; tasks from files of their own; joint transfer from a source task."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import make_tiny_backbone, tiny_run, write_csv
from transferdesk.config import RunConfig, load_config
from transferdesk.data import load_splits, read_dataset
from transferdesk.errors import TransferDeskError
from transferdesk.model.modeling import IntentModel
from transferdesk.training.train import run_training, train_and_register
from transferdesk.training.trainer import init_head_from_prototypes

# Two factors in every message: its topic (the intent) and its mood (a second task). Each
# head must read other words of the message, through the one encoder both share.
TOPICS = {
    "track_order": ["parcel", "delivery", "courier"],
    "reset_password": ["password", "login", "account"],
    "refund_status": ["refund", "money", "repayment"],
}
MOODS = {"angry": ["furious", "awful", "terrible"], "happy": ["thanks", "lovely", "great"]}
FILLERS = ["about my", "question on the", "regarding my"]
WORDS = {w for group in (*TOPICS.values(), *MOODS.values()) for w in group} | {
    w for f in FILLERS for w in f.split()
}


def _messages(pick: range) -> list[tuple[str, str, str]]:
    """(text, topic, mood) for the word combinations whose index falls in `pick` (mod 6)."""
    rows = []
    for (topic, topic_words), (mood, mood_words) in itertools.product(TOPICS.items(), MOODS.items()):
        combos = list(itertools.product(topic_words, mood_words, FILLERS))
        rows += [
            (f"{filler} {t} {m}", topic, mood) for i, (t, m, filler) in enumerate(combos) if i % 6 in pick
        ]
    return rows


@pytest.fixture(scope="module")
def mood_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_backbone(tmp_path_factory.mktemp("mood-bert"), WORDS)


def _files(tmp_path: Path, unlabelled_mood: int = 0) -> dict[str, Path]:
    """train/valid/test with a `mood` column: held-out word combinations in valid and test.
    The first `unlabelled_mood` training rows have no mood label."""
    header = ("text", "label", "mood")
    train = [(t, a, "" if i < unlabelled_mood else b) for i, (t, a, b) in enumerate(_messages(range(0, 3)))]
    return {
        "train": write_csv(tmp_path / "train.csv", train, header),
        "valid": write_csv(tmp_path / "valid.csv", _messages(range(3, 4)), header),
        "test": write_csv(tmp_path / "test.csv", _messages(range(4, 6)), header),
    }


def _run(backbone: Path, files: dict[str, Path], tmp_path: Path, **overrides: object) -> RunConfig:
    return tiny_run(backbone, files, tmp_path / "registry", **{"data.tasks": ["mood"], **overrides})


def test_two_heads_learn_two_tasks_over_one_encoder(mood_backbone: Path, tmp_path: Path) -> None:
    cfg = _run(mood_backbone, _files(tmp_path), tmp_path)
    version = train_and_register(cfg)
    assert version.tasks == {"mood": ["angry", "happy"]}
    test = version.metrics["test"]
    # Held-out word combinations: each head has learnt its own factor of the message.
    assert test["accuracy"] >= 0.9 and test["tasks"]["mood"]["accuracy"] >= 0.9
    assert test["tasks"]["mood"]["rows"] == len(_messages(range(4, 6)))
    assert (version.path / "test" / "confusion_mood.png").is_file()
    assert "| mood |" in (version.path / "test" / "report.md").read_text()
    assert "Task `mood`" in version.card
    assert "mood_accuracy" in version.metrics["valid_history"][-1]

    model = IntentModel.from_pretrained(version)
    [answer] = model.predict(["about my parcel furious"])
    assert answer.intent == "track_order" and answer.tasks["mood"][0] == "angry"
    # One forward pass gives every head: the intent's columns are those predict_proba returns.
    intent, tasks, _ = model.predict_heads(["regarding my login lovely"])
    assert np.allclose(intent, model.predict_proba(["regarding my login lovely"]))
    assert tasks["mood"].shape == (1, 2) and np.isclose(tasks["mood"].sum(), 1.0)


def test_untrained_second_head_is_chance(mood_backbone: Path, tmp_path: Path) -> None:
    """The check above can fail: without the mood head's loss, mood stays at chance."""
    cfg = _run(mood_backbone, _files(tmp_path), tmp_path, **{"data.tasks": {"mood": {"weight": 1e-9}}})
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"head_init": "random"})})
    result = run_training(cfg)
    probs = result.model.predict_heads(result.splits.valid.texts).tasks["mood"]
    truth = result.splits.valid.tasks["mood"]
    accuracy = np.mean(
        [result.model.tasks["mood"][j] == t for j, t in zip(probs.argmax(1), truth, strict=True)]
    )
    assert accuracy < 0.8


def test_rows_without_a_task_label_still_train_the_other(mood_backbone: Path, tmp_path: Path) -> None:
    files = _files(tmp_path, unlabelled_mood=12)
    train, _ = read_dataset(files["train"], task_columns={"mood": "mood"})
    assert train.tasks["mood"][:12] == [None] * 12 and train.tasks["mood"][12] is not None
    result = run_training(_run(mood_backbone, files, tmp_path))
    assert len(result.splits.train) == len(_messages(range(0, 3)))  # every row trains the intent
    history = result.fit.history[-1]
    assert history["accuracy"] >= 0.9 and history["mood_accuracy"] >= 0.9
    assert (
        0 < history["seconds"] == result.fit.seconds < 300
        or 0 < history["seconds"] < result.fit.seconds < 300
    )


def test_task_with_a_training_file_of_its_own(mood_backbone: Path, tmp_path: Path) -> None:
    """Intent rows without a mood column, mood rows from another file: tasks from two files."""
    intents = [(t, a) for t, a, _ in _messages(range(0, 3))]
    moods = [(t, b) for t, _, b in _messages(range(0, 3))]
    files = {
        "train": write_csv(tmp_path / "intents.csv", intents),
        "valid": write_csv(tmp_path / "valid.csv", _messages(range(3, 4)), ("text", "label", "mood")),
    }
    mood_file = write_csv(tmp_path / "moods.csv", moods, ("text", "feeling"))
    tasks = {"mood": {"train": str(mood_file), "column": "feeling"}}
    result = run_training(_run(mood_backbone, files, tmp_path, **{"data.tasks": tasks}))
    train, valid = result.splits.own["mood"]
    assert len(train) + len(valid) == len(moods)
    assert result.model.tasks == {"mood": ["angry", "happy"]}
    assert result.fit.history[-1]["mood_accuracy"] >= 0.8


def test_task_data_problems_are_refused_with_their_reason(tmp_path: Path) -> None:
    files = _files(tmp_path)
    cfg = load_config(None, {"data.train": str(files["train"]), "data.tasks": ["urgency"]})
    with pytest.raises(TransferDeskError, match="no column 'urgency' for task 'urgency'"):
        load_splits(cfg.data, 1)
    one_class = write_csv(
        tmp_path / "one.csv",
        [(t, a, "angry") for t, a, _ in _messages(range(0, 3))],
        ("text", "label", "mood"),
    )
    cfg = load_config(None, {"data.train": str(one_class), "data.tasks": ["mood"]})
    with pytest.raises(TransferDeskError, match="task 'mood' needs two classes at least; found angry"):
        load_splits(cfg.data, 1)
    with pytest.raises(TransferDeskError, match="task name 'intent'"):
        load_config(None, {"data.tasks": ["intent"]})


def test_joint_source_task_trains_beside_the_target(mood_backbone: Path, tmp_path: Path) -> None:
    """The source task as a head of its own in the target stage: no source stage, its head
    dropped at publish unless kept."""
    files = _files(tmp_path)
    source = write_csv(tmp_path / "source.csv", [(t, b) for t, _, b in _messages(range(0, 6))])
    overrides = {"data.source": str(source), "recipe": ["joint", "finetune"], "data.tasks": []}
    cfg = _run(mood_backbone, files, tmp_path, **overrides)
    version = train_and_register(cfg)
    assert version.meta.source_checkpoint is None and version.tasks == {}
    assert "source_accuracy" in version.metrics["valid_history"][-1]
    assert "Transfer from the source task: joint" in version.card
    kept = train_and_register(_run(mood_backbone, files, tmp_path, **overrides, **{"joint.keep_head": True}))
    assert kept.tasks == {"source": ["angry", "happy"]}
    [answer] = IntentModel.from_pretrained(kept).predict(["about my parcel furious"])
    assert set(answer.tasks) == {"source"}


def test_prototype_start_of_a_task_head(mood_backbone: Path, tmp_path: Path) -> None:
    cfg = _run(mood_backbone, _files(tmp_path), tmp_path)
    splits = load_splits(cfg.data, 1)
    model = IntentModel.from_backbone(
        str(mood_backbone), splits.intents, cfg.model, tasks=splits.task_labels()
    )
    init_head_from_prototypes(model, splits.train.task("mood"), "mood")
    weights = model.network.heads["mood"].weight.detach()
    assert weights.norm(dim=1).min() > 0 and not np.allclose(weights[0].numpy(), weights[1].numpy())


def test_config_takes_tasks_as_names_or_settings(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"data": {"tasks": {"urgency": {"weight": 0.5}, "sentiment": {}}}}))
    cfg = load_config(path, {"data.tasks.urgency.weight": 0.25})
    assert cfg.data.tasks["urgency"].weight == 0.25 and cfg.data.task_columns() == {
        "urgency": "urgency",
        "sentiment": "sentiment",
    }
    assert json.loads(cfg.model_dump_json())["data"]["tasks"]["sentiment"]["column"] is None


def test_onnx_export_answers_every_head_as_torch(mood_backbone: Path, tmp_path: Path) -> None:
    from transferdesk.config import ExportConfig
    from transferdesk.model.export import export_version

    files = _files(tmp_path)
    version = train_and_register(_run(mood_backbone, files, tmp_path))
    export = export_version(version.path, ExportConfig(runtimes=["onnx"], data=str(files["valid"])))
    # Every head is checked against torch at export, on the rows labelled for it.
    head = export.meta.runtimes["onnx"].heads["mood"]
    assert head.argmax_agreement == 1.0 and head.accuracy == head.torch_accuracy is not None
    texts = [t for t, _, _ in _messages(range(4, 6))]
    reference = IntentModel.from_pretrained(version.path, "cpu").predict_heads(texts)
    onnx = IntentModel.from_pretrained(version.path, "cpu", "onnx")
    assert onnx.tasks == {"mood": ["angry", "happy"]}
    intent, tasks, _ = onnx.predict_heads(texts)
    assert (
        np.abs(intent - reference.intent).max() < 1e-4
        and np.abs(tasks["mood"] - reference.tasks["mood"]).max() < 1e-4
    )
    ids = [onnx.tokenizer(t)["input_ids"] for t in texts]
    assert [p.tasks for p in onnx.predict_ids(ids)] == [p.tasks for p in onnx.predict(texts)]


def test_command_line_shows_every_head(
    mood_backbone: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from transferdesk.cli.main import main

    files = _files(tmp_path)
    version = train_and_register(_run(mood_backbone, files, tmp_path))
    capsys.readouterr()
    assert main(["predict", str(version.path), "about my parcel furious"]) == 0
    assert "mood: angry" in capsys.readouterr().out
    assert (
        main(["evaluate", str(version.path), "--data", str(files["test"]), "--output", str(tmp_path / "e")])
        == 0
    )
    assert "| mood |" in capsys.readouterr().out and (tmp_path / "e" / "confusion_mood.png").is_file()
    assert (
        main(["data", "check", str(files["train"]), "--tasks", "mood", "--backbone", "none", "--json"]) == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["tasks"] == {"mood": {"angry": 45, "happy": 45}} and "words" in summary
    assert main(["data", "check", str(files["train"]), "--tasks", "urgency", "--backbone", "none"]) == 1
    assert "no column 'urgency' (--tasks)" in capsys.readouterr().out
