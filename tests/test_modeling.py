from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import toy_rows
from transferdesk.config import CalibrationConfig, ModelConfig
from transferdesk.errors import TransferDeskError
from transferdesk.model.modeling import IntentModel
from transferdesk.model.network import IntentClassifier, load_encoder

TEXTS = ["where is my parcel", "forgot my password", "refund status please", "weather today"]


@pytest.fixture
def model(tiny_backbone: Path) -> IntentModel:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=str(tiny_backbone), max_length=16, dropout=0.0)
    return IntentModel.from_backbone(str(tiny_backbone), ["track_order", "reset_password", "refund"], cfg)


def test_save_then_load_predicts_identically(model: IntentModel, tmp_path: Path) -> None:
    model.threshold = 0.4
    model.save_pretrained(tmp_path / "m")
    again = IntentModel.load(tmp_path / "m", device="cpu")
    assert again.labels == model.labels and again.threshold == 0.4 and again.max_length == 16
    assert np.array_equal(again.predict_proba(TEXTS), model.predict_proba(TEXTS))
    assert again.predict(TEXTS) == model.predict(TEXTS)


def test_out_of_scope_exactly_below_the_threshold(model: IntentModel) -> None:
    probs = np.array([[0.5, 0.3, 0.2], [0.4999, 0.3001, 0.2], [0.2, 0.2, 0.6]], dtype=np.float64)
    logits = np.log(probs)  # at temperature 1, softmax gives the probabilities back
    model.calibration, model.threshold = CalibrationConfig(score="softmax"), 0.5
    answers = model.predictions(logits, k=2)
    assert [p.out_of_scope for p in answers] == [False, True, False]
    assert [p.label for p in answers] == ["track_order", "oos", "refund"]
    assert [p.intent for p in answers] == ["track_order", "track_order", "refund"]  # the guess stays
    assert answers[2].ranked[0] == ("refund", pytest.approx(0.6)) and len(answers[2].ranked) == 2
    assert answers[2].alternatives == answers[2].ranked[1:]
    assert model.decide(model.split_heads(logits)) == [p.label for p in answers]
    for p in model.predict(TEXTS, k=3):  # and from texts, the same rule
        assert p.out_of_scope == (p.confidence < model.threshold)
        assert [c for _, c in p.ranked] == sorted((c for _, c in p.ranked), reverse=True)


def test_calibration_separates_out_of_scope_on_validation(model: IntentModel) -> None:
    model.labels = ["a", "b"]
    logits = np.log(np.array([[0.95, 0.05], [0.1, 0.9], [0.55, 0.45], [0.6, 0.4]]))
    true = ["a", "b", "oos", "oos"]
    model.calibration = CalibrationConfig(temperature=False, score="softmax")
    model.calibrate_from_logits(logits, true)
    assert 0.6 < model.threshold <= 0.9
    assert model.decide(model.split_heads(logits)) == true


def test_calibration_without_oos_rows_keeps_most_in_scope(model: IntentModel) -> None:
    model.labels = ["a", "b"]
    probs = np.linspace(0.55, 0.99, 100)[:, None] * np.array([[1.0, 0.0]]) + [[0.0, 1.0]] * (
        1 - np.linspace(0.55, 0.99, 100)[:, None]
    )
    # softmax: the energy of log-probabilities is 0 for every row, ties broken by rounding alone.
    model.calibration = CalibrationConfig(temperature=False, score="softmax")
    point = model.calibrate_from_logits(np.log(probs), ["a"] * 100)
    kept = np.mean(~model.out_of_scope(model.split_heads(np.log(probs)).score))
    assert 0.9 <= kept < 1.0 and point.handoff_rate == pytest.approx(1 - kept)


def test_calibrate_from_texts_sets_temperature_and_threshold(model: IntentModel) -> None:
    rows = toy_rows(0, 2)
    texts, labels = [t for t, _ in rows] + ["weather today"], [lab for _, lab in rows] + ["oos"]
    model.labels = ["track_order", "reset_password", "refund_status"]
    model.fit_scores(texts, labels)  # as training does before calibrating: the default score's
    model.calibrate_from_logits(model.predict_logits(texts), labels)
    assert np.isfinite(model.threshold) and model.temperature != 1.0


def test_saved_model_keeps_its_calibration(model: IntentModel, tmp_path: Path) -> None:
    model.calibration = CalibrationConfig(score="energy", target="handoff_rate", value=0.1)
    model.temperature, model.threshold = 1.7, -2.5
    model.save_pretrained(tmp_path / "m")
    again = IntentModel.load(tmp_path / "m", device="cpu")
    assert (again.calibration, again.temperature, again.threshold) == (model.calibration, 1.7, -2.5)
    assert [p.out_of_scope for p in again.predict(TEXTS)] == [p.out_of_scope for p in model.predict(TEXTS)]


def test_forward_check_refuses_non_finite_weights(model: IntentModel) -> None:
    model.check_forward()
    with torch.no_grad():
        model.network.head.weight.fill_(float("nan"))
    with pytest.raises(TransferDeskError, match="non-finite"):
        model.check_forward()


def proba_from_ids(model: IntentModel, ids: list[list[int]], batch_size: int = 64) -> np.ndarray:
    """Intent probabilities for texts tokenized elsewhere (Serve's tokenizer)."""
    return model.split_heads(model.logits_from_ids(ids, batch_size)).intent


def test_probabilities_from_token_ids_match_those_from_texts(tiny_backbone: Path) -> None:
    # Serve tokenizes in one deployment and classifies in another: same answer as in-process.
    encoder, tokenizer = load_encoder(str(tiny_backbone))
    model = IntentModel(IntentClassifier(encoder, 3, "mean", 0.1), tokenizer, ["a", "b", "c"], max_length=6)
    texts = ["where is my parcel", "refund", "my password is not working please reset it now"]
    ids = tokenizer(texts)["input_ids"]  # unpadded, not cut: the last one is longer than 6
    assert len(ids[2]) > 6
    by_ids, by_text = proba_from_ids(model, ids), model.predict_proba(texts)
    assert by_ids.shape == (3, 3)
    assert torch.allclose(torch.from_numpy(by_ids), torch.from_numpy(by_text), atol=1e-5)


def test_length_sorted_passes_keep_input_order(tiny_backbone: Path) -> None:
    encoder, tokenizer = load_encoder(str(tiny_backbone))
    model = IntentModel(IntentClassifier(encoder, 3, "mean", 0.1), tokenizer, ["a", "b", "c"], max_length=16)
    texts = ["a much longer message about a parcel", "hi", "refund please", "x", "where is my order now"]
    ids = tokenizer(texts)["input_ids"]
    whole = proba_from_ids(model, ids, batch_size=64)
    for per_pass in (1, 2):  # sorted by length into passes, answered in the order asked
        assert np.allclose(proba_from_ids(model, ids, batch_size=per_pass), whole, atol=1e-5)
    assert not np.allclose(whole[0], whole[1])


def test_bf16_predictions_on_cpu_stay_close_to_fp32(tiny_backbone: Path) -> None:
    encoder, tokenizer = load_encoder(str(tiny_backbone))
    model = IntentModel(IntentClassifier(encoder, 3, "mean", 0.1), tokenizer, ["a", "b", "c"], max_length=16)
    texts = ["where is my parcel", "refund", "reset my password please"]
    fp32 = model.predict_proba(texts)
    model.precision = "bf16"
    bf16 = model.predict_proba(texts)
    assert not np.array_equal(bf16, fp32)  # autocast really ran in bf16
    assert np.allclose(bf16, fp32, atol=0.02)
    model.for_serving("bf16")  # weights cast once instead of on every call: the same answers
    assert model.network.head.weight.dtype == torch.bfloat16
    assert np.allclose(model.predict_proba(texts), bf16, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_model_saved_on_gpu_loads_anywhere_and_serves_in_half_precision(
    model: IntentModel, tmp_path: Path
) -> None:
    fp32 = model.predict_proba(TEXTS)
    model.save_pretrained(tmp_path / "cpu")
    on_gpu = IntentModel.load(tmp_path / "cpu", device="cuda")
    assert next(on_gpu.network.parameters()).device.type == "cuda"
    assert np.allclose(on_gpu.predict_proba(TEXTS), fp32, atol=0.02)  # auto: half-precision autocast
    on_gpu.save_pretrained(tmp_path / "gpu")  # saved from the GPU: loads on a CPU-only machine
    again = IntentModel.load(tmp_path / "gpu", device="cpu")
    assert np.allclose(again.predict_proba(TEXTS), fp32, atol=1e-6)
    on_gpu.for_serving("bf16")
    assert on_gpu.network.head.weight.dtype == torch.bfloat16
    assert np.allclose(on_gpu.predict_proba(TEXTS), fp32, atol=0.02)


def test_centroid_score_is_the_similarity_to_the_nearest_intent(model: IntentModel, tmp_path: Path) -> None:
    texts = ["where is my parcel", "parcel not here", "forgot my password", "reset password", "refund status"]
    labels = ["track_order", "track_order", "reset_password", "reset_password", "refund"]
    assert model.layout.output_names == ()
    width = model.predict_logits(TEXTS).shape[1]
    model.fit_scores([*texts, "weather today"], [*labels, "oos"], batch_size=2)  # oos row left out
    assert model.layout.output_names == ("centroids",)
    logits = model.predict_logits(texts)
    assert logits.shape[1] == width + len(model.labels)  # one similarity per intent, after the heads
    vectors = model.embed(texts)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    refund = unit[4]  # an intent with one row: its centroid is that row's direction
    assert logits[4, 3 + 2] == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(logits[:, 3 + 2], unit @ refund, atol=1e-5)
    order = unit[0] + unit[1]
    assert np.allclose(logits[:, 3], unit @ (order / np.linalg.norm(order)), atol=1e-5)
    model.calibration = CalibrationConfig(score="centroid")
    assert np.allclose(model.split_heads(logits).score, logits[:, 3:].max(axis=1))
    # Saved with the head and loaded back: the same similarities, and so the same answers.
    model.threshold = float(np.median(model.split_heads(logits).score))
    model.save_pretrained(tmp_path / "m")
    again = IntentModel.load(tmp_path / "m", device="cpu")
    assert again.layout == model.layout and np.allclose(again.predict_logits(texts), logits, atol=1e-6)
    assert again.predict(texts) == model.predict(texts)


def test_centroid_score_without_centroids_is_refused(model: IntentModel) -> None:
    model.calibration = CalibrationConfig(score="centroid")
    with pytest.raises(TransferDeskError, match="centroids"):
        model.predict(TEXTS)
