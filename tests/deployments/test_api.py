"""The request schema without a running service: the text rule the validator enforces is the
one the schema states."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from deployments.api import TEXT_PATTERN, TextsRequest

SAMPLES = ["x", "ok\tfine\n", "a\r\nb", "\u0085x", "   ", "\u2003\u00a0", "a\x00b", "\x7f", "bell\x07", "é"]


@pytest.mark.parametrize("text", SAMPLES)
def test_the_validator_accepts_what_the_schema_pattern_accepts(text: str) -> None:
    try:
        TextsRequest.model_validate({"text": text})
        accepted = True
    except ValidationError:
        accepted = False
    assert accepted == bool(re.fullmatch(TEXT_PATTERN, text))
    assert TextsRequest.model_json_schema()["properties"]["text"]["pattern"] == TEXT_PATTERN
