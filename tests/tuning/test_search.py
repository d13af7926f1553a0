import csv
from pathlib import Path

import pytest

from tests.conftest import make_tiny_backbone
from tests.tuning.conftest import write_spec
from transferdesk.errors import TransferDeskError
from transferdesk.model.modeling import IntentModel
from transferdesk.registry import ModelVersion, open_version, verify
from tuning.config import TuneSpec, load_spec
from tuning.run import export, prepare_spec, search, tune_and_export


def _rows(version: ModelVersion) -> list[dict]:
    with open(version.path / "search" / "trials.csv") as f:
        return list(csv.DictReader(f))


def test_source_stage_trained_once_and_test_split_unread(
    local_ray, tiny_backbone: Path, tmp_path: Path
) -> None:
    source = tmp_path / "train.csv"  # the toy training data doubles as a source task
    path = write_spec(
        tmp_path,
        tiny_backbone,
        candidates=[
            {"name": "tiny", "backbone": str(tiny_backbone)},
            {"name": "tiny+src", "backbone": str(tiny_backbone), "source": str(source)},
            {"name": "tiny+src-again", "backbone": str(tiny_backbone), "source": str(source)},
            {
                "name": "tiny+joint",
                "backbone": str(tiny_backbone),
                "source": str(source),
                "transfer": "joint",
            },
        ],
        search={"num_samples": 5, "algorithm": "random"},
    )
    spec = prepare_spec(load_spec(path))
    test = Path(spec.run.data.test)
    good = test.read_bytes()
    test.write_bytes(b"text,label\n\xff\xfe broken,oos\n")  # any read of it would fail the trial
    found = search(spec)
    results = found.results
    assert not results.errors and len(results) == 5
    checkpoints = list((tmp_path / "registry" / "sources").iterdir())
    assert len(checkpoints) == 1  # two candidates, one shared source stage, trained once (joint: none)
    # Every candidate's baseline trial ran: the joint one trained the source task beside the target.
    assert {r.config["candidate"] for r in results} == {"tiny", "tiny+src", "tiny+src-again", "tiny+joint"}
    test.write_bytes(good)
    version = export(spec, found)
    assert verify(version.path) and IntentModel.from_pretrained(version).labels == version.labels
    assert version.config.data.test == test.name  # a name, not this machine's path
    assert version.meta.candidate in {"tiny", "tiny+src", "tiny+src-again", "tiny+joint"}
    assert version.tasks == {}  # a joint source's head is dropped at publish
    if version.meta.source and version.meta.candidate != "tiny+joint":
        assert version.meta.source_checkpoint == f"sources/{checkpoints[0].name}"
    assert version.card.startswith("# toy-search v1\n") and version.meta.timings["train_seconds"] > 0
    assert "accuracy" in version.metrics and version.metrics["search"]["trials"] == 5
    search_dir = version.path / "search"
    assert len(_rows(version)) == 5 and (search_dir / "curves.png").is_file()
    assert (search_dir / "search.yaml").is_file() and (search_dir / "trials.md").is_file()
    assert str(tmp_path) not in (search_dir / "search.yaml").read_text()


def test_asha_stops_weak_trials_early(local_ray, tiny_backbone: Path, tmp_path: Path) -> None:
    # Learning rates from useless (1e-9) to useful: ASHA should cut the useless ones.
    path = write_spec(
        tmp_path,
        tiny_backbone,
        space={"epochs": 6, "encoder_lr": [1e-9, 1e-3], "head_lr": [1e-9, 1e-2]},
        search={"num_samples": 8, "algorithm": "random"},
    )
    version = tune_and_export(load_spec(path))
    rows = _rows(version)
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    assert any(r["stopped_early"] == "True" for r in rows)
    assert any(int(r["epochs_run"]) == 6 for r in rows)
    assert sum(r["baseline"] == "True" for r in rows) == 1  # the untuned recipe ran first


def test_time_budget_ends_the_search_and_still_exports(
    local_ray, tiny_backbone: Path, tmp_path: Path
) -> None:
    path = write_spec(
        tmp_path,
        tiny_backbone,
        space={"epochs": 3},
        # Far more trials than 20 s can hold: tiny trials finished all of 200 once prediction got faster.
        search={"num_samples": 5000, "max_concurrent": 2, "time_budget_s": 20},
    )
    rows = _rows(tune_and_export(load_spec(path)))
    assert 1 <= len(rows) < 5000


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"candidates": []}, "candidates"),
        ({"space": {"encoder_lr": [1e-3, 1e-5]}}, "low 0.001 is above high"),
        ({"candidates": [{"name": "x", "source": "/nonexistent/source.csv"}]}, "not found"),
        ({"data": {"extra_train": ["/nonexistent/reviewed.csv"]}}, "reviewed.csv not found"),
        ({"candidates": [{"name": "x", "backbone": "/nonexistent/model"}]}, "neither a model directory"),
        ({"search": {"gpus_per_trial": 4}}, "asks for 4 GPU but the cluster has 0"),
        ({"candidates": [{"name": "x", "pretrained": False, "source": "a.csv"}]}, "cannot have a source"),
        ({"candidates": [{"name": "x", "transfer": "joint"}]}, "joint needs a `source`"),
    ],
)
def test_bad_specs_fail_before_any_trial(local_ray, tiny_backbone, tmp_path, sections, message) -> None:
    with pytest.raises(TransferDeskError, match=message):
        tune_and_export(load_spec(write_spec(tmp_path, tiny_backbone, **sections)))
    assert not (tmp_path / "tune").exists()  # no trial ran


def test_existing_search_is_not_overwritten(local_ray, tiny_backbone, tmp_path) -> None:
    spec = load_spec(write_spec(tmp_path, tiny_backbone, search={"num_samples": 1}))
    first = tune_and_export(spec)
    with pytest.raises(TransferDeskError, match=r"already exists.*--resume"):
        tune_and_export(spec)
    with pytest.raises(TransferDeskError, match="nothing to resume"):
        tune_and_export(_renamed(spec, "other"), resume=True)
    # --resume-if-exists (a retried Ray Job): a finished, exported search is not exported again,
    assert tune_and_export(spec, resume="auto").path == first.path
    assert not (first.path.parent / "v2").exists()
    # and a search that does not exist yet is started.
    other = tune_and_export(_renamed(spec, "other"), resume="auto")
    assert other.spec == "other/v1"


def _renamed(spec: TuneSpec, name: str) -> TuneSpec:
    return spec.model_copy(update={"run": spec.run.model_copy(update={"name": name})})


def test_interrupted_search_resumes_without_losing_finished_trials(
    tiny_backbone: Path, tmp_path: Path
) -> None:
    import signal
    import subprocess
    import sys
    import time

    path = write_spec(
        tmp_path,
        tiny_backbone,
        # 40 epochs make each trial last seconds, so Ctrl-C lands mid-search.
        space={"epochs": 40, "batch_size": [4]},
        training={"patience": 50},
        search={"num_samples": 4, "max_concurrent": 1, "algorithm": "optuna"},
    )
    experiment = tmp_path / "tune" / "toy-search"
    command = [sys.executable, "-m", "tuning", str(path)]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while len(list(experiment.glob("run_trial_*"))) < 2:  # one at a time: the 2nd starts after the 1st ends
        assert first.poll() is None and time.monotonic() < deadline, "first trial never finished"
        time.sleep(0.5)
    done = {
        p.name: (p / "result.json").read_text()
        for p in experiment.glob("run_trial_*")
        if (p / "result.json").is_file() and '"done": true' in (p / "result.json").read_text()
    }
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=120)
    assert first.returncode != 0 and "--resume" in err
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    version = open_version(resumed.stdout.strip().splitlines()[-1])
    assert len(_rows(version)) == 4
    for name, before in done.items():  # finished trials were kept, not run again
        assert (experiment / name / "result.json").read_text() == before


def test_unreachable_cluster_is_a_clear_error(tiny_backbone: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    path = write_spec(tmp_path, tiny_backbone)
    proc = subprocess.run(
        [sys.executable, "-m", "tuning", str(path), "--address", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "cannot reach the Ray cluster at 127.0.0.1:1" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "tune").exists()


def test_pool_search_shares_teachers_and_reports_what_the_pool_bought(
    local_ray, tiny_backbone: Path, tmp_path: Path
) -> None:
    pool = tmp_path / "pool.txt"
    pool.write_text("where is the parcel now\nreset the password now\nrefund money please\nparcel please\n")
    wide = make_tiny_backbone(tmp_path / "wide-bert", width=48, layers=3)
    space = {"epochs": 2, "semi_supervised": [True, False], "teachers": [1, 2], "student_epochs": 2}
    path = write_spec(
        tmp_path,
        tiny_backbone,
        data={"unlabelled": str(pool)},
        space=space | {"teacher_backbone": [None, str(wide)]},
        search={"num_samples": 4, "algorithm": "random"},
    )
    spec = prepare_spec(load_spec(path))
    found = search(spec)
    assert not found.results.errors
    teachers = sorted(d.name for d in (tmp_path / "registry" / "teachers").iterdir())
    # Two seeds on each encoder ("": the candidate's own), each trained once.
    own, larger = found.preparations["tiny", "", True], found.preparations["tiny", str(wide), True]
    assert len(teachers) == 4 and sorted(own.teachers + larger.teachers) == teachers
    version = export(spec, found)
    rows = _rows(version)
    baselines = [r for r in rows if r["baseline"] == "True"]
    assert sorted(r["semi_supervised"] for r in baselines) == ["False", "True"]  # with and without
    assert len(rows) == 4 and {r["semi_supervised"] for r in rows} == {"True", "False"}
    assert version.config.data.unlabelled == "pool.txt"
    assert load_spec(version.search_dir / "search.yaml").space.teacher_backbone == [None, "wide-bert"]
    assert {r["teacher_backbone"] for r in rows} <= {"", "wide-bert"}  # None: empty; no machine paths
    if version.metrics["search"]["best_config"]["semi_supervised"]:
        assert version.metrics["semi_supervised"]["pool"]["rows_used"] == 4
        assert "Unlabelled pool: `pool.txt`" in version.card


def test_task_files_of_their_own_reach_trials_as_absolute_paths(
    tiny_backbone: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trials run in directories of their own: a task's own file, given relative, must not be lost."""
    from tests.conftest import toy_rows, write_csv

    monkeypatch.chdir(tmp_path)
    moods = [(text, "calm" if i % 2 else "upset") for i, (text, _) in enumerate(toy_rows(0, 8))]
    write_csv(tmp_path / "moods.csv", moods, ("text", "mood"))
    path = write_spec(tmp_path, tiny_backbone, data={"tasks": {"mood": {"train": "moods.csv"}}})
    spec = prepare_spec(load_spec(path))
    assert spec.run.data.tasks["mood"].train == str(tmp_path / "moods.csv")


def test_auto_metric_resolved_from_the_validation_file(tiny_backbone: Path, tmp_path: Path) -> None:
    # The toy validation file has an out-of-scope row: checkpoints chosen as epochs are.
    spec = prepare_spec(load_spec(write_spec(tmp_path, tiny_backbone)))
    assert spec.search.metric == "accuracy_auroc"
    in_scope_only = tmp_path / "valid-in-scope.csv"
    rows = Path(spec.run.data.valid).read_text().splitlines()
    in_scope_only.write_text("\n".join(r for r in rows if not r.endswith(",oos")) + "\n")
    path = write_spec(tmp_path, tiny_backbone, data={"valid": str(in_scope_only)})
    assert prepare_spec(load_spec(path)).search.metric == "accuracy"
    path = write_spec(tmp_path, tiny_backbone, training={"monitor": "macro_f1"})
    assert prepare_spec(load_spec(path)).search.metric == "macro_f1"  # as training picks epochs
    path = write_spec(
        tmp_path, tiny_backbone, data={"valid": str(in_scope_only)}, search={"metric": "accuracy_auroc"}
    )
    with pytest.raises(TransferDeskError, match="accuracy_auroc needs out-of-scope rows"):
        prepare_spec(load_spec(path))


def test_a_missing_teacher_backbone_stops_the_search_before_any_trial(
    tiny_backbone: Path, tmp_path: Path
) -> None:
    path = write_spec(tmp_path, tiny_backbone, space={"teacher_backbone": [None, "./no-such-teacher"]})
    with pytest.raises(TransferDeskError, match="no-such-teacher is neither a model directory"):
        prepare_spec(load_spec(path))


def test_the_run_teacher_is_made_absolute_like_the_space_choices(
    tiny_backbone: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Else a relative run value never matches its own choice, and baselines take the first."""
    monkeypatch.chdir(tmp_path)
    make_tiny_backbone(tmp_path / "wide-bert", width=48, layers=3)
    path = write_spec(
        tmp_path,
        tiny_backbone,
        semi_supervised={"teacher_backbone": "wide-bert"},
        space={"teacher_backbone": [None, "wide-bert"]},
    )
    spec = prepare_spec(load_spec(path))
    assert spec.run.semi_supervised.teacher_backbone == str(tmp_path / "wide-bert")
    assert spec.space.teacher_backbone == [None, str(tmp_path / "wide-bert")]


def test_a_recipe_of_ones_own_runs_in_a_search(local_ray, tiny_backbone: Path, tmp_path: Path) -> None:
    """tests/toy_recipe.py, a linear probe: every trial fits with it, as `train` does."""
    from tests.test_recipe import TOY, encoder_unchanged

    path = write_spec(tmp_path, tiny_backbone, recipe=[TOY], search={"num_samples": 2})
    version = tune_and_export(load_spec(path))
    assert version.metrics["search"]["trials"] == 2 and version.config.recipe == [TOY]
    assert encoder_unchanged(version.path, tiny_backbone)


def test_a_search_runs_the_contrastive_stage_once_for_every_trial(
    local_ray, tiny_backbone: Path, tmp_path: Path
) -> None:
    pool = tmp_path / "pool.txt"
    pool.write_text("where is the parcel now\nreset the password now\nrefund money please\nparcel please\n")
    path = write_spec(
        tmp_path,
        tiny_backbone,
        data={"unlabelled": str(pool)},
        contrastive={"epochs": 1, "batch_size": 4},
        semi_supervised={"student_epochs": 1},
        space={"epochs": 2, "semi_supervised": [True]},
        search={"num_samples": 2, "algorithm": "random"},
    )
    found = search(prepare_spec(load_spec(path)))
    assert not found.results.errors
    prepared = found.preparations["tiny", "", True]
    assert prepared.adapted and prepared.backbone == prepared.adapted and prepared.teachers
    # One encoder adapted to the pool (sources/), whichever trial ran: the teachers learnt from it.
    adapted = [d for d in (tmp_path / "registry" / "sources").iterdir() if not d.name.startswith(".")]
    assert [str(d) for d in adapted] == [prepared.adapted]
    version = export(prepare_spec(load_spec(path)), found)
    assert version.metrics["semi_supervised"]["contrastive_encoder"] == f"sources/{adapted[0].name}"
