"""Out-of-scope scores as named components: a score (and the network output it reads) defined
and registered in this file serves a model end to end, the ONNX graph included."""

from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TOY_INTENTS, toy_rows
from transferdesk.config import CalibrationConfig, ModelConfig, build_config
from transferdesk.errors import TransferDeskError
from transferdesk.model.export import export_onnx
from transferdesk.model.modeling import IntentModel
from transferdesk.model.runtime import OnnxSession
from transferdesk.model.scores import (
    OUTPUTS,
    SCORES,
    NetworkOutput,
    OutOfScopeScore,
    OutputLayout,
    register_output,
    register_score,
    training_calibration,
)


class Norm(NetworkOutput):
    """The length of a message's sentence vector, over the training rows' mean length."""

    name = "norm"
    what = "the training rows' mean sentence vector length"

    def width(self, intents: int) -> int:
        return 1

    def fit(self, model: IntentModel, texts: list[str], labels: list[str], batch_size: int) -> torch.Tensor:
        return torch.from_numpy(np.linalg.norm(model.embed(texts, batch_size), axis=1).mean(keepdims=True))

    def forward(self, state: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        return embedded.norm(dim=-1, keepdim=True) / state.to(embedded.dtype)


class NormScore(OutOfScopeScore):
    name = "norm"
    outputs = ("norm",)

    def score(self, logits: np.ndarray, temperature: float, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        return outputs["norm"][:, 0].astype(np.float64)


@pytest.fixture
def norm_score() -> Iterator[None]:
    register_output(Norm)
    register_score(NormScore)
    yield
    del SCORES["norm"], OUTPUTS["norm"]


@pytest.fixture
def model(tiny_backbone: Path) -> IntentModel:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=str(tiny_backbone), max_length=16, dropout=0.0)
    return IntentModel.from_backbone(str(tiny_backbone), list(TOY_INTENTS), cfg)


def _rows(start: int, stop: int, oos: list[str]) -> tuple[list[str], list[str]]:
    rows = [*toy_rows(start, stop), *((text, "oos") for text in oos)]
    return [t for t, _ in rows], [label for _, label in rows]


def test_a_score_registered_here_serves_a_model_end_to_end(
    norm_score: None, model: IntentModel, tmp_path: Path
) -> None:
    train, valid = _rows(0, 4, ["weather today"]), _rows(4, 6, ["oos weather", "today"])
    model.fit_scores(*train, batch_size=4)  # every registered score's outputs, in column order
    assert model.layout == OutputLayout(3, (), (("centroids", 3), ("norm", 1)))
    # Trains on energy (the norms are fitted after training), calibrates and predicts on its own.
    assert training_calibration(CalibrationConfig(score="norm")).score == "energy"
    model.calibration = CalibrationConfig(score="norm", target="handoff_rate", value=0.2)
    logits = model.predict_logits(valid[0])
    assert logits.shape == (len(valid[0]), 7)
    model.calibrate_from_logits(logits, valid[1])
    heads = model.split_heads(logits)
    norms = np.linalg.norm(model.embed(valid[0]), axis=1)
    assert np.allclose(heads.score, norms / np.linalg.norm(model.embed(train[0]), axis=1).mean(), atol=1e-5)
    answers = model.predict(valid[0])
    assert [p.out_of_scope for p in answers] == list(heads.score < model.threshold)
    assert 0 < sum(p.out_of_scope for p in answers) < len(answers)
    # Saved with the head and loaded back: the same layout, numbers and answers.
    model.save_pretrained(tmp_path / "m")
    again = IntentModel.load(tmp_path / "m", device="cpu")
    assert again.layout == model.layout and again.calibration.score == "norm"
    assert np.array_equal(again.predict_logits(valid[0]), logits) and again.predict(valid[0]) == answers
    # The norms are in the ONNX graph: the same scores from ONNX Runtime.
    export_onnx(model, tmp_path / "m.onnx", 18)
    onnx = model.with_session(OnnxSession(tmp_path / "m.onnx"), "onnx")
    assert onnx.layout == model.layout
    assert np.allclose(onnx.predict_logits(valid[0]), logits, atol=1e-4)
    assert np.allclose(onnx.predict_heads(valid[0]).score, heads.score, atol=1e-4)


def test_a_model_with_an_output_no_module_registered_is_refused(
    norm_score: None, model: IntentModel, tmp_path: Path
) -> None:
    model.fit_scores(*_rows(0, 2, []), scores=["norm"])
    assert model.layout.output_names == ("norm",)
    model.save_pretrained(tmp_path / "m")
    del SCORES["norm"], OUTPUTS["norm"]
    try:
        with pytest.raises(TransferDeskError, match=r"output\(s\) norm, which no loaded module registered"):
            IntentModel.load(tmp_path / "m", device="cpu")
    finally:
        register_output(Norm)
        register_score(NormScore)


def test_scores_fit_only_what_they_read(model: IntentModel) -> None:
    model.fit_scores(*_rows(0, 2, []), scores=["softmax", "energy"])
    assert model.layout.output_names == ()
    model.calibration = CalibrationConfig(score="centroid")
    with pytest.raises(TransferDeskError, match=r"needs the intents' centroids \(network output centroids\)"):
        model.predict(["where is my parcel"])


def test_a_configuration_names_a_registered_score(norm_score: None) -> None:
    assert build_config({"calibration": {"score": "norm"}}).calibration.score == "norm"
    registered = "registered: softmax, energy, centroid, norm"
    with pytest.raises(TransferDeskError, match=f"unknown out-of-scope score 'nope'; {registered}"):
        build_config({"calibration": {"score": "nope"}})


def test_the_layout_says_whose_columns_are_which() -> None:
    layout = OutputLayout.of(3, {"mood": 2}, ["centroids"])
    assert layout.width == 8 and layout.output_names == ("centroids",)
    columns = np.arange(16).reshape(2, 8)
    intent, tasks, outputs = layout.split(columns)
    assert intent.tolist() == [[0, 1, 2], [8, 9, 10]] and np.array_equal(layout.intent(columns), intent)
    assert tasks["mood"].tolist() == [[3, 4], [11, 12]] and outputs["centroids"][0].tolist() == [5, 6, 7]
    assert layout.join("i", {"mood": "m"}, {"centroids": "c"}) == ["i", "m", "c"]
