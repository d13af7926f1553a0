import math
from pathlib import Path

import numpy as np
import pytest
import torch

from transferdesk.config import RunConfig, StageConfig
from transferdesk.data import read_dataset
from transferdesk.model.modeling import IntentModel
from transferdesk.registry import verify
from transferdesk.training.optim import build_optimizer, warmup_linear_decay
from transferdesk.training.recipes.source import source_key
from transferdesk.training.train import run_training


def _with(cfg: RunConfig, **overrides: object) -> RunConfig:
    """cfg with dotted overrides, e.g. _with(cfg, **{"training.epochs": 1})."""
    data = cfg.model_dump()
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            node = node[key]
        node[leaf] = value
    return RunConfig.model_validate(data)


def test_warmup_then_linear_decay() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_linear_decay(opt, total_steps=10, warmup_ratio=0.2)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert lrs[2:] == sorted(lrs[2:], reverse=True) and lrs[-1] == pytest.approx(0.125)


def test_optimizer_groups_and_frozen_layers(tiny_config: RunConfig) -> None:
    model = IntentModel.from_backbone(tiny_config.model.backbone, ["a", "b"], tiny_config.model)
    for p in model.network.encoder.embeddings.parameters():
        p.requires_grad = False
    stage = StageConfig(encoder_lr=1e-5, head_lr=1e-3, weight_decay=0.1)
    groups = build_optimizer(model.network, stage).param_groups
    assert {(g["lr"], g["weight_decay"]) for g in groups} == {
        (1e-5, 0.1),
        (1e-5, 0.0),
        (1e-3, 0.1),
        (1e-3, 0.0),
    }
    optimised = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in optimised for p in model.network.encoder.embeddings.parameters())
    bias = model.network.head.bias
    assert [g["weight_decay"] for g in groups if any(p is bias for p in g["params"])] == [0.0]


def test_training_learns_the_toy_task(tiny_config: RunConfig) -> None:
    result = run_training(tiny_config)
    losses = [h["loss"] for h in result.fit.history]
    assert losses[-1] < losses[0] * 0.7
    best = result.fit.history[result.fit.best_epoch - 1]
    assert best["accuracy"] >= 0.8  # six validation rows; chance is 1/3
    # Validation has an out-of-scope row: the epoch is chosen on accuracy and AUROC together.
    assert result.fit.best_metric == best["accuracy_auroc"] == (best["accuracy"] + best["oos_auroc"]) / 2
    assert [h["epoch"] for h in result.fit.history] == list(range(1, result.fit.epochs_run + 1))
    assert math.isfinite(result.model.threshold) and result.model.calibration.score == "centroid"
    assert (
        "centroids" in result.model.layout.output_names
    )  # stored after training: the score has what it needs


def test_seeded_runs_repeat_exactly(tiny_config: RunConfig) -> None:
    cfg = _with(tiny_config, **{"training.epochs": 2, "model.head_init": "random"})
    a, b = run_training(cfg), run_training(cfg)
    assert torch.equal(a.model.network.head.weight, b.model.network.head.weight)
    c = run_training(_with(cfg, **{"runtime.seed": 7}))
    assert not torch.equal(a.model.network.head.weight, c.model.network.head.weight)


def test_early_stopping_restores_the_best_epoch(tiny_config: RunConfig) -> None:
    # A learning rate this small cannot improve on the prototype head: no epoch beats the first.
    cfg = _with(
        tiny_config,
        **{
            "training.epochs": 10,
            "training.patience": 2,
            "training.encoder_lr": 1e-12,
            "training.head_lr": 1e-12,
        },
    )
    result = run_training(cfg)
    assert result.fit.stopped_early and result.fit.epochs_run == 3 and result.fit.best_epoch == 1


def test_no_validation_file_means_stratified_split(tiny_config: RunConfig) -> None:
    result = run_training(_with(tiny_config, **{"data.valid": None, "data.valid_fraction": 0.25}))
    assert set(result.splits.valid.counts().values()) == {1}
    assert set(result.splits.train.counts().values()) == {3}


def test_source_stage_trains_once_and_is_reused(
    tiny_config: RunConfig, toy_files: dict, tmp_path: Path
) -> None:
    cfg = _with(tiny_config, **{"data.source": str(toy_files["train"]), "source_training.epochs": 1})
    first = run_training(cfg)
    checkpoint = first.source_checkpoint
    assert checkpoint is not None and verify(checkpoint)
    assert checkpoint.name == source_key(cfg)
    stamp = (checkpoint / "manifest.json").stat().st_mtime_ns
    second = run_training(cfg)
    assert second.source_checkpoint == checkpoint
    assert (checkpoint / "manifest.json").stat().st_mtime_ns == stamp
    assert "source_seconds" in second.timings
    # The cached stage leaves the target stage the same random numbers: the same model.
    assert torch.equal(first.model.network.head.weight, second.model.network.head.weight)
    # A source checkpoint is a backbone in its own right.
    reused = run_training(_with(tiny_config, **{"model.backbone": str(checkpoint)}))
    assert reused.fit.best_metric > 0
    # Other source settings make another checkpoint.
    assert source_key(_with(cfg, **{"source_training.epochs": 2})) != source_key(cfg)


def test_few_shot_k_limits_training_rows(tiny_config: RunConfig) -> None:
    result = run_training(_with(tiny_config, **{"data.few_shot_k": 2}))
    assert set(result.splits.train.counts().values()) == {2}
    full, _ = read_dataset(tiny_config.data.train)
    assert len(result.splits.train) < len(full)


def test_supervised_contrastive_prefers_clustered_embeddings() -> None:
    from transferdesk.training.losses import supervised_contrastive

    targets = torch.tensor([0, 0, 1, 1])
    clustered = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    mixed = clustered[[0, 2, 1, 3]]
    assert supervised_contrastive(clustered, targets, 0.1) < supervised_contrastive(mixed, targets, 0.1)
    assert supervised_contrastive(clustered, torch.arange(4), 0.1) == 0.0  # no positive pairs


def test_supcon_objective_and_epoch_hook(tiny_config: RunConfig) -> None:
    from transferdesk.data import load_splits
    from transferdesk.training.trainer import Callback, Trainer

    class Seen(Callback):
        def on_epoch(self, entry: dict, improved: bool, model: IntentModel) -> None:
            seen.append((entry["epoch"], improved))

    cfg = _with(tiny_config, **{"training.objective": "supcon", "training.epochs": 4})
    splits = load_splits(cfg.data, cfg.runtime.seed)
    seen: list[tuple[int, bool]] = []
    trainer = Trainer.of(cfg, torch.device("cpu"))
    _, result = trainer.train(
        cfg.model.backbone, splits.train, splits.valid, cfg.training, "test", callbacks=[Seen()]
    )
    assert [e for e, _ in seen] == [1, 2, 3, 4] and seen[0][1] is True
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_shuffled_batches_cover_everything_once_with_similar_lengths() -> None:
    from transferdesk.training.sampling import shuffled_batches

    lengths = [(i * 37) % 100 for i in range(200)]
    batches = shuffled_batches(lengths, 10, torch.Generator().manual_seed(0))
    assert sorted(i for b in batches for i in b) == list(range(200))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 30  # random batches of 10 would spread about 80
    again = shuffled_batches(lengths, 10, torch.Generator().manual_seed(0))
    assert again == batches


def test_intent_grouped_batches_give_supcon_anchors_partners() -> None:
    from transferdesk.training.sampling import intent_grouped_batches

    targets = [i % 40 for i in range(400)]  # 40 intents, 10 rows each
    batches = intent_grouped_batches(targets, 16, torch.Generator().manual_seed(0), per_intent=4)
    assert sorted(i for b in batches for i in b) == list(range(400))
    rows = [i for b in batches for i in b]
    partnered = sum(sum(targets[j] == targets[i] for j in b) > 1 for b in batches for i in b)
    assert partnered / len(rows) > 0.8  # random batches of 16 over 40 intents: about 0.3
    assert len({targets[i] for i in batches[0]}) < 16


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
            ],
        ),
    ],
)
def test_own_random_stream_leaves_the_device_stream_as_it_was(device: str) -> None:
    from transferdesk.training.trainer import own_random_stream

    torch.manual_seed(0)
    expected = torch.rand(4, device=device)
    torch.manual_seed(0)
    with own_random_stream(3, torch.device(device)):
        inside = torch.rand(4, device=device)
    assert torch.equal(torch.rand(4, device=device), expected)
    with own_random_stream(3, torch.device(device)):
        assert torch.equal(torch.rand(4, device=device), inside)  # seeded: the same each time


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_training_on_gpu_publishes_a_model_that_answers_alike_on_cpu(
    tiny_config: RunConfig, precision: str
) -> None:
    from transferdesk.training.train import train_and_register

    cfg = _with(tiny_config, **{"runtime.device": "cuda", "runtime.precision": precision})
    result = run_training(cfg)
    assert result.model.device.type == "cuda"
    losses = [h["loss"] for h in result.fit.history]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] * 0.7  # fp16: the scaler ran
    assert result.fit.history[result.fit.best_epoch - 1]["accuracy"] >= 0.8

    version = train_and_register(cfg)
    texts = ["where is my parcel", "forgot my password", "refund status please", "weather today"]
    on_gpu = IntentModel.from_pretrained(version, device="cuda")
    on_cpu = IntentModel.from_pretrained(version, device="cpu")
    assert on_gpu.device.type == "cuda" and on_cpu.device.type == "cpu"
    cpu = on_cpu.predict_proba(texts)
    assert np.allclose(on_gpu.predict_proba(texts), cpu, atol=0.06)  # auto: bf16 autocast
    on_gpu.precision = "fp32"
    assert np.allclose(on_gpu.predict_proba(texts), cpu, atol=1e-4)  # the same weights


def test_cpu_runs_leave_torch_free_to_pick_its_kernels() -> None:
    from transferdesk.config import RuntimeConfig
    from transferdesk.training.trainer import configure_runtime

    assert configure_runtime(RuntimeConfig(device="cpu", num_threads=1)).type == "cpu"
    assert not torch.are_deterministic_algorithms_enabled()  # process-wide: CPU needs none


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_runs_switch_deterministic_kernels_on_and_off() -> None:
    from transferdesk.config import RuntimeConfig
    from transferdesk.training.trainer import configure_runtime

    try:
        configure_runtime(RuntimeConfig(device="cuda", num_threads=1))
        assert torch.are_deterministic_algorithms_enabled()
        configure_runtime(RuntimeConfig(device="cuda", num_threads=1, deterministic=False))
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_outlier_exposure_ranks_unseen_out_of_scope_messages_lower(
    tiny_backbone: Path, toy_files: dict, tmp_path: Path
) -> None:
    from tests.conftest import tiny_run, toy_rows, write_csv
    from transferdesk.training.train import train_and_register

    doubted = ["weather", "today", "weather weather", "today oos", "oos", "oos oos today"]
    train = write_csv(tmp_path / "t.csv", toy_rows(0, 4) + [(t, "oos") for t in doubted])
    files = {**toy_files, "train": train}
    unseen, scoped = ["oos weather", "today weather", "weather oos today", "today today"], toy_rows(6, 8)

    def gap(weight: float) -> float:
        """How far the unseen out-of-scope messages' energy lies below the in-scope ones'."""
        overrides = {"training.outlier_weight": weight, "calibration.score": "energy"}
        cfg = tiny_run(tiny_backbone, files, tmp_path / "registry", **overrides)
        model = run_training(cfg).model
        scores = model.predict_heads(unseen + [t for t, _ in scoped]).score
        return float(scores[len(unseen) :].mean() - scores[: len(unseen)].mean())

    assert gap(1.0) > gap(0.0) + 1.0  # measured: 2.6 against 0.6
    version = train_and_register(
        tiny_run(tiny_backbone, files, tmp_path / "registry", **{"training.outlier_weight": 0.5})
    )
    assert version.meta.outlier_examples == len(doubted)
    assert "6 out-of-scope ones taught as outliers" in version.card
    off = train_and_register(tiny_run(tiny_backbone, files, tmp_path / "registry"))  # the default: 0
    assert off.meta.outlier_examples == 0


def test_a_target_measured_on_few_rows_is_flagged(tiny_config: RunConfig, caplog) -> None:
    from transferdesk.training.train import train_and_register

    cfg = _with(tiny_config, **{"calibration.target": "oos_recall", "calibration.value": 0.8})
    with caplog.at_level("WARNING", logger="transferdesk.training.train"):
        version = train_and_register(cfg)
    chosen = version.metrics["calibration"]["valid"]
    # One out-of-scope validation row, handed off: recall 1, and all that says is 0.21–1.
    assert chosen["oos_recall"] == 1.0 and chosen["target_rows"] == 1
    low, high = chosen["target_interval"]
    assert low == pytest.approx(0.207, abs=0.001) and high == pytest.approx(1.0)
    assert "the threshold's oos_recall was measured on 1 validation row(s)" in caplog.text
    card = "measured on 1 validation row(s): on traffic like them it is likely (95%) between 20.7%"
    assert card in version.card
    # the drift reference: every validation row's decision, out-of-scope ones included
    calibration = version.metrics["calibration"]
    mix, rows = calibration["valid_intent_mix"], calibration["valid_rows"]
    assert set(mix) <= {*version.labels, "oos"} and sum(mix.values()) == pytest.approx(1.0)
    assert all(share * rows == pytest.approx(round(share * rows)) for share in mix.values())
