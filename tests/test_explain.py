"""Explanations by occlusion (transferdesk/model/explain.py) and `transferdesk predict --explain`."""

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TOY_INTENTS
from transferdesk.cli.main import main
from transferdesk.errors import TransferDeskError
from transferdesk.model.explain import explain, variants, weigh
from transferdesk.model.modeling import IntentModel


def test_variants_leave_out_one_word_each() -> None:
    assert variants("where is  my parcel?") == [
        "where is  my parcel?",
        "is my parcel?",
        "where my parcel?",
        "where is parcel?",
        "where is my",
    ]
    why = weigh("a b", "x", [0.9, 0.5, 1.0])
    assert [(w.text, w.start, w.end) for w in why.words] == [("a", 0, 1), ("b", 2, 3)]
    assert [w.weight for w in why.words] == pytest.approx([0.4, -0.1]) and why.top(1)[0].text == "a"
    with pytest.raises(ValueError, match="3 confidences for 2"):
        weigh("a", "x", [0.9, 0.5, 0.4])


def test_the_top_words_removed_lower_the_confidence(toy_version: Path) -> None:
    model = IntentModel.from_pretrained(toy_version)
    texts = [TOY_INTENTS[intent][6] for intent in TOY_INTENTS]
    explanations = explain(model, texts)
    for text, why in zip(texts, explanations, strict=True):
        assert why.intent == model.predict([text])[0].intent
        assert [w.text for w in why.words] == text.split()
        top = why.top(1)[0]
        assert top.weight > 0
        rest = " ".join(w.text for w in why.words if w is not top)
        column = model.labels.index(why.intent)
        assert model.predict_proba([rest])[0, column] == pytest.approx(why.confidence - top.weight, abs=1e-5)
    # Another intent than the top one, on request; its weights are of its own confidence.
    other = next(label for label in model.labels if label != explanations[0].intent)
    asked = explain(model, texts[:1], [other])[0]
    assert asked.intent == other and asked.confidence < explanations[0].confidence
    with pytest.raises(TransferDeskError, match="not an intent"):
        explain(model, texts[:1], ["nope"])


def test_predict_explain_on_the_command_line(toy_version: Path, capsys) -> None:
    assert main(["predict", str(toy_version), "where is my parcel", "--explain", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    words = row["explanation"]["words"]
    assert [w["text"] for w in words] == ["where", "is", "my", "parcel"]
    assert np.isfinite([w["weight"] for w in words]).all()
    assert main(["predict", str(toy_version), "where is my parcel", "--explain"]) == 0
    assert "why " in capsys.readouterr().out
