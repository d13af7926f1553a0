"""API keys: short keys refused at start, a rotated key file taking effect without a restart."""

from __future__ import annotations

import asyncio
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
    # A broken or emptied file fails closed: no key works (the service says 503) until fixed.
    for broken in ("short\n", ""):
        key_file.write_text(broken)
        os.utime(key_file, ns=(1, len(broken)))
        assert ring.current() == [] and "cannot be read" in ring.error
        key_file.write_text("second-key-000000002\n")
        assert ring.current() == [b"second-key-000000002"] and ring.error is None
    key_file.unlink()
    assert ring.current() == [] and ring.error


def test_requests_before_the_replica_is_live_are_refused() -> None:
    """Until the Ingress exists there are no limits or keys to check a request against."""
    import httpx

    from deployments.api import LIVE, api

    LIVE.pop("ingress", None)

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
            return await client.post("/v1/route", json={"text": "hi"})

    response = asyncio.run(call())
    assert response.status_code == 503 and response.json()["error"]["code"] == "starting"
    assert response.headers["retry-after"]
