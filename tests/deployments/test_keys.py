"""API keys: short keys refused at start, a rotated key file taking effect without a restart."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deployments import config
from deployments.config import KEYS_ENV, KEYS_FILE_ENV, KeyRing
from transferdesk.errors import TransferDeskError


@pytest.fixture
def key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "keys"
    monkeypatch.setenv(KEYS_FILE_ENV, str(path))
    monkeypatch.delenv(KEYS_ENV, raising=False)
    monkeypatch.setattr(config, "KEYS_CHECK_S", 0.0)
    return path


def test_short_keys_are_refused_at_start(key_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file.write_text("a-long-enough-key-0001\nshort\n")
    with pytest.raises(TransferDeskError, match="shorter than 16 characters"):
        KeyRing()
    key_file.write_text("")
    with pytest.raises(TransferDeskError, match="no API keys"):
        KeyRing()
    monkeypatch.setenv(KEYS_ENV, "tiny")
    with pytest.raises(TransferDeskError, match="shorter than 16"):
        KeyRing()


def test_a_rotated_key_file_is_read_again(key_file: Path) -> None:
    key_file.write_text("first-key-0000000001\n")
    ring = KeyRing()
    assert ring.current() == [b"first-key-0000000001"]
    # As a Secret is rotated: a new file swapped in by a link, not written in place.
    new = key_file.with_name("keys-new")
    new.write_text("second-key-000000002\n")
    os.replace(new, key_file)
    assert ring.current() == [b"second-key-000000002"]  # the first key is revoked
    key_file.write_text("short\n")  # a broken rotation keeps the last good keys
    os.utime(key_file, ns=(1, 1))
    assert ring.current() == [b"second-key-000000002"]
