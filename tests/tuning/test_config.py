from pathlib import Path

import pytest
from ray.tune.search.sample import Categorical, Float, Integer

from transferdesk.errors import TransferDeskError
from tuning.config import SEARCHABLE, TuneSpec, load_spec
from tuning.space import baseline_points, param_space, trial_config

CONFIGS = Path(__file__).parent.parent.parent / "configs"


@pytest.mark.parametrize(
    "path",
    [p for p in sorted(CONFIGS.glob("*.yaml")) if p.read_text().startswith("# transferdesk tune")],
    ids=lambda p: p.name,
)
def test_ready_made_tuning_configs_load(path: Path) -> None:
    assert path.read_text().splitlines()[0] == f"# transferdesk tune configs/{path.name}"
    spec = load_spec(path)
    assert spec.candidates and spec.search.num_samples >= 1


def test_space_domains() -> None:
    spec = TuneSpec.model_validate(
        {
            "candidates": [{"name": "a"}, {"name": "b", "source": "s.csv", "objective": "supcon"}],
            "space": {
                "encoder_lr": [1e-5, 1e-4],
                "epochs": [3, 6],
                "batch_size": [8, 16],
                "dropout": 0.1,
                "pooling": ["cls"],
            },
        }
    )
    space = param_space(spec)
    assert isinstance(space["encoder_lr"], Float) and isinstance(space["epochs"], Integer)
    assert space["epochs"].upper == 7  # inclusive range; Tune's upper bound is exclusive
    assert isinstance(space["batch_size"], Categorical) and isinstance(space["candidate"], Categorical)
    assert space["dropout"] == 0.1 and space["pooling"] == "cls"


def test_trial_config_applies_samples_and_never_names_the_test_file() -> None:
    spec = TuneSpec.model_validate(
        {"run": {"data": {"train": "t.csv", "test": "test.csv", "source": "s.csv"}}}
    )
    params = {name: 1 for name in SEARCHABLE} | {
        "encoder_lr": 3e-5,
        "head_lr": 4e-3,
        "warmup_ratio": 0.1,
        "weight_decay": 0.0,
        "dropout": 0.05,
        "pooling": "cls",
        "max_length": 32,
        "batch_size": 8,
        "epochs": 4,
        "freeze_layers": 1,
        "semi_supervised": True,
        "pseudo_targets": "hard",
        "pseudo_threshold": 0.7,
        "teacher_backbone": "/models/mpnet",
        "candidate": "minilm",
    }
    cfg = trial_config(spec, params)
    assert (cfg.semi_supervised.targets, cfg.semi_supervised.threshold) == ("hard", 0.7)
    assert cfg.semi_supervised.teacher_backbone == "/models/mpnet"  # the student keeps the candidate's
    assert cfg.semi_supervised.teacher_training is None  # no pool: no teachers to pin
    assert (cfg.training.encoder_lr, cfg.training.epochs, cfg.model.pooling) == (3e-5, 4, "cls")
    # The candidate's recipe, as configured: its backbone and source (the run's own source is not
    # a candidate's), never the test file.
    assert cfg.model.backbone == "all-MiniLM-L6-v2" and cfg.data.source is None and cfg.data.test is None
    assert cfg.methods() == ["finetune"]
    assert cfg.runtime.num_threads == 1 and not cfg.runtime.progress


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"candidates": []}, "candidates"),
        ({"candidates": [{"name": "a"}, {"name": "a"}]}, "unique"),
        ({"space": {"epochs": [5, 2]}}, "low 5 is above high 2"),
        ({"space": {"batch_size": []}}, "batch_size"),
        ({"search": {"num_samples": 0}}, "num_samples"),
        ({"candidates": [{"name": "a"}, {"name": "b"}], "search": {"num_samples": 1}}, "baseline trials"),
        ({"name": "x", "training": {"epochs": 3}}, r"name, training: run settings go under `run:`"),
        ({"space": {"encoder_lr": [0, 1e-4]}}, r"space\.encoder_lr\.0: Input should be greater than 0"),
        ({"space": {"epochs": [0, 3]}}, r"space\.epochs\.0: Input should be greater than or equal to 1"),
        ({"space": {"pooling": ["max"]}}, r"space\.pooling\.0: Input should be 'mean' or 'cls'"),
    ],
)
def test_empty_or_contradictory_spaces_are_refused(tmp_path: Path, data: dict, message: str) -> None:
    import yaml

    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(TransferDeskError, match=message):
        load_spec(path)


def test_baseline_points_are_the_run_recipe_inside_the_space() -> None:
    spec = TuneSpec.model_validate(
        {
            "run": {"training": {"encoder_lr": 5e-5, "batch_size": 16}},
            "candidates": [{"name": "a"}, {"name": "b", "pretrained": False}],
            "space": {"encoder_lr": [1e-4, 1e-3], "batch_size": [8, 32], "dropout": 0.1},
        }
    )
    points = baseline_points(spec)
    assert [p["candidate"] for p in points] == ["a", "b"]
    assert points[0]["encoder_lr"] == 1e-4  # clipped into the range
    assert points[0]["batch_size"] == 8  # 16 is not a choice: the first choice
    assert "dropout" not in points[0]  # fixed values are not searched


def test_pool_searches_pin_the_teachers_and_compare_with_and_without_it() -> None:
    spec = TuneSpec.model_validate(
        {
            "run": {"data": {"train": "t.csv", "unlabelled": "pool.txt"}, "training": {"encoder_lr": 6e-5}},
            "candidates": [{"name": "a"}, {"name": "b"}],
            "space": {"semi_supervised": [True, False], "pseudo_threshold": [0.3, 0.9]},
        }
    )
    points = baseline_points(spec)
    assert [(p["candidate"], p["semi_supervised"]) for p in points] == [
        ("a", True),
        ("a", False),
        ("b", True),
        ("b", False),
    ]
    params = {**points[0], "encoder_lr": 9e-5}
    params |= {n: k.default[0] for n, k in SEARCHABLE.items() if n not in params}
    cfg = trial_config(spec, params)
    # The student takes the sampled rate; the teachers keep the run's own, so all trials share them.
    assert cfg.training.encoder_lr == 9e-5 and cfg.semi_supervised.teacher_training.encoder_lr == 6e-5


def test_a_setting_added_since_a_resumed_search_started_keeps_the_run_value() -> None:
    spec = TuneSpec.model_validate({"run": {"semi_supervised": {"teacher_backbone": "/models/mpnet"}}})
    params = {n: k.default[0] for n, k in SEARCHABLE.items() if n != "teacher_backbone"}
    cfg = trial_config(spec, params | {"candidate": "minilm"})
    assert cfg.semi_supervised.teacher_backbone == "/models/mpnet"


def test_a_preparation_the_search_never_made_is_a_clear_error() -> None:
    from transferdesk.config import RunConfig
    from transferdesk.training.recipe import Prepared
    from tuning.prepare import preparation

    cfg = RunConfig.model_validate(
        {"data": {"unlabelled": "pool.txt"}, "semi_supervised": {"teacher_backbone": "/models/mpnet"}}
    )
    prepared = {("minilm", "", True): Prepared("minilm"), ("minilm", "", False): Prepared("minilm")}
    with pytest.raises(
        TransferDeskError, match=r"candidate minilm with teacher backbone /models/mpnet .* new --name"
    ):
        preparation(prepared, cfg, "minilm")
    without_pool = cfg.model_copy(
        update={"semi_supervised": cfg.semi_supervised.model_copy(update={"enabled": False})}
    )
    assert preparation(prepared, without_pool, "minilm") is prepared[("minilm", "", False)]
