import json
import subprocess
import sys
from pathlib import Path

import pytest

from transferdesk.cli.main import build_parser, main


def _tiny_train_args(tiny_config, toy_files: dict) -> list[str]:
    return [
        "train",
        "--train",
        str(toy_files["train"]),
        "--valid",
        str(toy_files["valid"]),
        "--test",
        str(toy_files["test"]),
        "--backbone",
        tiny_config.model.backbone,
        "--output",
        tiny_config.output,
        "--training.epochs",
        "2",
        "--model.max_length",
        "16",
        "--runtime.progress",
        "false",
        "--runtime.num_threads",
        "1",
    ]


@pytest.fixture
def trained(tiny_config, toy_files: dict, capsys: pytest.CaptureFixture) -> Path:
    assert main(_tiny_train_args(tiny_config, toy_files)) == 0
    path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert path.is_dir()
    return path


def test_train_prints_the_new_version_last(trained: Path) -> None:
    assert trained.name == "v1" and (trained / "manifest.json").is_file()


def test_cli_overrides_reach_the_saved_config(trained: Path) -> None:
    saved = (trained / "config.yaml").read_text()
    assert "epochs: 2" in saved and "max_length: 16" in saved


def test_evaluate_writes_metrics_report_and_plot(trained: Path, toy_files: dict, capsys) -> None:
    assert main(["evaluate", str(trained), "--data", str(toy_files["test"])]) == 0
    out = capsys.readouterr().out
    metrics_path = Path(out.strip().splitlines()[-1])
    metrics = json.loads(metrics_path.read_text())
    assert {"accuracy", "macro_f1", "per_intent", "oos_recall", "oos_auroc", "speed"} <= metrics.keys()
    assert (metrics_path.parent / "confusion.png").is_file() and "| accuracy |" in out
    assert main(["models", "show", str(trained)]) == 0  # evaluations do not break the manifest


def test_predict_json_and_file(trained: Path, tmp_path: Path, capsys) -> None:
    lines = tmp_path / "texts.txt"
    lines.write_text("forgot my password\n\nwhere is my parcel\n")
    assert (
        main(
            ["predict", str(trained), "refund status please", "--file", str(lines), "--top-k", "2", "--json"]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert [r["text"] for r in rows] == ["refund status please", "forgot my password", "where is my parcel"]
    assert all(len(r["top"]) == 2 and r["top"][0]["confidence"] >= r["top"][1]["confidence"] for r in rows)
    assert main(["predict", str(trained), "where is my parcel"]) == 0
    assert "→" in capsys.readouterr().out


def test_models_list(trained: Path, capsys) -> None:
    assert main(["models", "list", str(trained.parent.parent), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["version"]) for r in rows] == [("intent-classifier", 1)]


def test_data_check_exit_codes(toy_files: dict, tmp_path: Path, capsys) -> None:
    assert main(["data", "check", str(toy_files["train"])]) == 0
    assert "12 rows, 3 intents" in capsys.readouterr().out
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nhello,a\n,a\nbye,b\nbye,b\n")
    assert main(["data", "check", str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"{bad}:3: error: empty utterance" in out and "exact duplicate" in out
    assert main(["data", "check", str(toy_files["test"]), "--against", str(toy_files["train"])]) == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["predict", "{tmp}/missing-model", "hello"],
        ["train", "--train", "{tmp}/missing.csv"],
        ["train", "--training.epochs", "-1"],
        ["train", "--config", "{tmp}/nope.yaml"],
    ],
)
def test_user_errors_exit_nonzero_without_traceback(argv: list[str], tmp_path: Path, capsys) -> None:
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_the_installed_command_reports_a_user_error_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "transferdesk", "predict", str(tmp_path / "missing-model"), "hello"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1].startswith("error:")
    assert "Traceback" not in proc.stderr


def test_help_lists_every_setting() -> None:
    parser = build_parser()
    train_help = parser._subparsers._group_actions[0].choices["train"].format_help()
    for flag in (
        "--train",
        "--valid",
        "--test",
        "--source",
        "--backbone",
        "--config",
        "--output",
        "--training.encoder_lr",
        "--source_training.epochs",
        "--runtime.precision",
        "--model.pooling",
        "--data.few_shot_k",
    ):
        assert flag in train_help
    for argv in (
        ["--help"],
        ["train", "--help"],
        ["evaluate", "--help"],
        ["predict", "--help"],
        ["data", "check", "--help"],
        ["models", "list", "--help"],
        ["models", "show", "--help"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args(argv)
        assert exit_info.value.code == 0


def test_one_override_syntax_with_values_read_as_typed(tmp_path: Path) -> None:
    from transferdesk.cli.flags import config_overrides
    from transferdesk.errors import TransferDeskError

    train = build_parser().parse_args(
        ["train", "--runtime.seed", "013", "--name", "123", "--set", "training.encoder_lr=1e-4"]
    )
    assert config_overrides(train) == {"runtime.seed": 13, "name": "123", "training.encoder_lr": 1e-4}
    tune = build_parser().parse_args(["tune", "x.yaml", "--space.batch_size", "[8, 16]", "--train", "t.csv"])
    assert config_overrides(tune) == {"space.batch_size": [8, 16], "run.data.train": "t.csv"}
    old = build_parser().parse_args(["tune", "x.yaml", "--set", "training.epochs=5"])
    with pytest.raises(TransferDeskError, match=r"did you mean run\.training\.epochs"):
        config_overrides(old)
    # Structured values as YAML, as docs/guides/tasks.md writes them (JSON-only CLI libraries
    # refuse these); none/null/empty is None.
    tasks = build_parser().parse_args(
        ["train", "--data.tasks", "{urgency: {weight: 0.5}}", "--set", "calibration.value=none"]
    )
    assert config_overrides(tasks) == {"data.tasks": {"urgency": {"weight": 0.5}}, "calibration.value": None}
    names = build_parser().parse_args(
        ["train", "--data.tasks", "[urgency, sentiment]", "--runtime.num_threads", ""]
    )
    assert config_overrides(names) == {"data.tasks": ["urgency", "sentiment"], "runtime.num_threads": None}


def test_metavars_name_the_types() -> None:
    subcommands = build_parser()._subparsers._group_actions[0].choices
    tune_help = subcommands["tune"].format_help()
    for shown in (
        "--space.encoder_lr TUPLE[FLOAT,FLOAT]",
        "--space.pooling LIST[{mean,cls}]",
        "--train FILE",
    ):
        assert shown in tune_help
    assert "ANNOTATED" not in tune_help and "LITERAL" not in subcommands["export"].format_help()
    assert "--data.tasks DICT[STR,TASKCONFIG]" in subcommands["train"].format_help()


def test_promote_rollback_and_stages(trained: Path, tiny_config, toy_files: dict, capsys) -> None:
    assert main(_tiny_train_args(tiny_config, toy_files)) == 0  # v2 beside v1
    model_dir = trained.parent
    capsys.readouterr()
    for version in ("v1", "v2"):
        argv = ["models", "promote", str(model_dir / version), "--stage", "production", "--reason", "r"]
        assert main([*argv, "--by", "ana"]) == 0
    assert "intent-classifier@production → v2 (was v1), by ana" in capsys.readouterr().out
    assert main(["models", "rollback", str(model_dir), "--stage", "production", "--reason", "bad"]) == 0
    assert "→ v1 (was v2)" in capsys.readouterr().out
    assert main(["models", "stages", str(model_dir), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["stages"]["production"]["version"] == 1 and len(shown["history"]) == 3
    assert main(["predict", f"{model_dir}@production", "where is my parcel", "--json"]) == 0
    with pytest.raises(SystemExit):  # a promotion says why
        main(["models", "promote", str(model_dir / "v1"), "--stage", "production"])
