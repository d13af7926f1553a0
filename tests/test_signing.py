"""Signed promotions: a stage record signed with the promoter's key resolves where the key is
trusted; unsigned, untrusted, renamed or altered records are refused there."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from transferdesk.cli.main import main
from transferdesk.errors import TransferDeskError
from transferdesk.registry import Registry, open_version
from transferdesk.registry.signing import TRUSTED_KEYS_ENV, Signer, generate

RELEASED = Path(__file__).parent / "fixtures" / "released"
NAME = "published-0.1.0"


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    """A registry holding one published version (the released fixture), its stages cleared."""
    root = shutil.copytree(RELEASED, tmp_path / "registry", ignore=shutil.ignore_patterns("stages*"))
    return root


def _trust(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *lines: str) -> Path:
    trusted = tmp_path / "trusted-keys"
    trusted.write_text("# holders of promotion keys\n" + "\n".join(lines) + "\n")
    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(trusted))
    return trusted


def _edit_record(registry: Path, **changes: object) -> None:
    path = registry / NAME / "stages.json"
    stages = json.loads(path.read_text())
    stages["production"].update(changes)
    path.write_text(json.dumps(stages))


def test_a_signed_promotion_resolves_where_its_key_is_trusted(
    registry: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    assert main(["models", "keygen", "ana", "--dir", str(tmp_path / "keys")]) == 0
    public = capsys.readouterr().out.strip()
    key = tmp_path / "keys" / "ana.pem"
    assert key.stat().st_mode & 0o777 == 0o600 and public.startswith("ana ")
    argv = ["models", "promote", f"{registry}/{NAME}/v1", "--stage", "production", "--reason", "r"]
    assert main([*argv, "--key", str(key)]) == 0
    assert "by ana, signed (key " in capsys.readouterr().out
    _trust(tmp_path, monkeypatch, public)
    assert open_version(f"{registry}/{NAME}@production").version == 1
    # The name comes from the key: another one on the command line is refused.
    assert main([*argv, "--key", str(key), "--by", "bo"]) == 2  # a user error
    assert "made in its key's name, ana" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"reason": "nobody asked"}, "was altered since ana signed it"),
        ({"version": 2}, "was altered since ana signed it"),
        ({"by": "bo"}, "promoted by 'bo', but its key is held by 'ana'"),
        ({"signature": None}, "is not signed"),
    ],
)
def test_an_altered_record_is_refused(
    registry: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: dict, message: str
) -> None:
    key, public = generate(tmp_path / "keys", "ana")
    Registry(registry).promote(f"{registry}/{NAME}/v1", "production", "ignored", "r", Signer.load(key))
    _trust(tmp_path, monkeypatch, public)
    _edit_record(registry, **change)
    with pytest.raises(TransferDeskError, match=message):
        open_version(f"{registry}/{NAME}@production")


def test_unsigned_and_untrusted_promotions_are_refused_where_keys_are_trusted(
    registry: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Registry(registry).promote(f"{registry}/{NAME}/v1", "production", "ana", "unsigned")
    spec = f"{registry}/{NAME}@production"
    assert open_version(spec).version == 1  # nobody asked for signatures: a laptop
    _, trusted_line = generate(tmp_path / "keys", "ana")
    _trust(tmp_path, monkeypatch, trusted_line)
    with pytest.raises(TransferDeskError, match=r"is not signed.*promote it again with --key"):
        open_version(spec)
    stranger, _ = generate(tmp_path / "keys", "mallory")
    Registry(registry).promote(f"{registry}/{NAME}/v1", "production", "x", "r", Signer.load(stranger))
    with pytest.raises(TransferDeskError, match=r"signed by key [0-9a-f]{16}, which .* does not trust"):
        open_version(spec)


def test_keys_and_trust_files_fail_closed(
    registry: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key, _ = generate(tmp_path / "keys", "ana")
    with pytest.raises(TransferDeskError, match="exists"):
        generate(tmp_path / "keys", "ana")  # never replaced
    key.chmod(0o644)
    with pytest.raises(TransferDeskError, match="readable by others"):
        Signer.load(key)
    Registry(registry).promote(f"{registry}/{NAME}/v1", "production", "ana", "r")
    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(tmp_path / "missing"))
    with pytest.raises(TransferDeskError, match="cannot be read"):
        open_version(f"{registry}/{NAME}@production")
    for text, message in (("", "holds no key"), ("ana not-a-key\n", "expected `NAME PUBLIC-KEY`")):
        _trust(tmp_path, monkeypatch, text)
        with pytest.raises(TransferDeskError, match=message):
            open_version(f"{registry}/{NAME}@production")
