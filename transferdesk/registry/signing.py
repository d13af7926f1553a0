"""Signed promotions: a stage record (stages.json) carries an Ed25519 signature by the key of
whoever promoted, and a reader that trusts a set of public keys refuses a record that is
unsigned, signed by a key it does not know, or altered since it was signed.

Whoever can write the registry's files can point a stage at any version; the signature is
what tells serving that someone holding a promoter's key chose it. The name a record gives
(`by`) is the key's: a trusted-keys file maps each public key to its holder, so a record
cannot claim another name than its key's.

- The promoter's key: a PEM file (PKCS#8, unencrypted, readable by its owner alone), made by
  `transferdesk models keygen NAME`; `--key` or $TRANSFERDESK_SIGNING_KEY when promoting.
- The trusted keys: a text file, one `NAME PUBLIC-KEY` line a key (keygen prints the line);
  $TRANSFERDESK_TRUSTED_KEYS names it. Where it is set (the production overlay sets it for
  serving), only signed records resolve; where unset, records are not checked (a laptop).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from transferdesk.errors import TransferDeskError

SIGNING_KEY_ENV = "TRANSFERDESK_SIGNING_KEY"
TRUSTED_KEYS_ENV = "TRANSFERDESK_TRUSTED_KEYS"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


def key_id(public: Ed25519PublicKey) -> str:
    """A short, stable name for a public key: the start of the SHA-256 of its raw bytes."""
    return hashlib.sha256(_raw(public)).hexdigest()[:16]


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def signed_bytes(fields: dict) -> bytes:
    """What a signature covers: the record's fields as canonical JSON."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Signer:
    """A promoter's private key, and the name it signs as (the key file's stem)."""

    name: str
    key: Ed25519PrivateKey

    @classmethod
    def load(cls, path: str | Path) -> Signer:
        path = Path(path)
        if not path.is_file():
            raise TransferDeskError(
                f"signing key {path} not found; make one: transferdesk models keygen NAME"
            )
        if path.stat().st_mode & 0o077:
            raise TransferDeskError(f"signing key {path} is readable by others; chmod 600 it")
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as err:
            raise TransferDeskError(
                f"signing key {path} is not an unencrypted PEM private key: {err}"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise TransferDeskError(f"signing key {path} is not an Ed25519 key")
        if not NAME_RE.match(path.stem):
            raise TransferDeskError(f"signing key {path}: its name must match {NAME_RE.pattern}")
        return cls(path.stem, key)

    @classmethod
    def from_env(cls) -> Signer | None:
        path = os.environ.get(SIGNING_KEY_ENV)
        return cls.load(path) if path else None

    @property
    def key_id(self) -> str:
        return key_id(self.key.public_key())

    def sign(self, fields: dict) -> str:
        return base64.b64encode(self.key.sign(signed_bytes(fields))).decode()


def generate(directory: str | Path, name: str) -> tuple[Path, str]:
    """A new key pair: the private key written to DIRECTORY/NAME.pem (mode 600, never
    overwritten), and the trusted-keys line of its public key."""
    if not NAME_RE.match(name):
        raise TransferDeskError(f"key name {name!r} must match {NAME_RE.pattern}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.pem"
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:  # O_EXCL: an existing key is never replaced; 0o600 from the start, never readable by others
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise TransferDeskError(f"{path} exists; choose another name or directory") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return path, f"{name} {base64.b64encode(_raw(key.public_key())).decode()}"


class TrustedKeys:
    """The public keys whose signatures a reader accepts, by key id, each with its holder's name."""

    def __init__(self, keys: dict[str, tuple[str, Ed25519PublicKey]], origin: str) -> None:
        self.keys, self.origin = keys, origin

    @classmethod
    def load(cls, path: str | Path) -> TrustedKeys:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:  # fail closed: a reader asked to check never skips the check
            raise TransferDeskError(f"trusted keys {path} cannot be read ({err.strerror})") from None
        keys = {}
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                name, encoded = line.split()
                public = Ed25519PublicKey.from_public_bytes(base64.b64decode(encoded, validate=True))
            except ValueError:
                raise TransferDeskError(
                    f"{path}:{number}: expected `NAME PUBLIC-KEY` (as `transferdesk models keygen` prints)"
                ) from None
            keys[key_id(public)] = (name, public)
        if not keys:
            raise TransferDeskError(f"trusted keys {path} holds no key: every promotion would be refused")
        return cls(keys, str(path))

    @classmethod
    def from_env(cls) -> TrustedKeys | None:
        path = os.environ.get(TRUSTED_KEYS_ENV)
        return cls.load(path) if path else None

    def check(self, what: str, fields: dict, signature: str | None) -> None:
        """Refuses a record (`fields`, with its `by` and `key_id`) that is unsigned, signed by a
        key not in this file, names another holder than its key's, or was altered."""
        if signature is None or fields.get("key_id") is None:
            raise TransferDeskError(
                f"{what} is not signed, and ${TRUSTED_KEYS_ENV} ({self.origin}) asks for signed "
                "promotions; promote it again with --key"
            )
        if fields["key_id"] not in self.keys:
            raise TransferDeskError(
                f"{what} is signed by key {fields['key_id']}, which {self.origin} does not trust"
            )
        name, public = self.keys[fields["key_id"]]
        if fields.get("by") != name:
            raise TransferDeskError(
                f"{what} says it was promoted by {fields.get('by')!r}, but its key is held by {name!r}"
            )
        try:
            public.verify(base64.b64decode(signature), signed_bytes(fields))
        except (InvalidSignature, ValueError):
            raise TransferDeskError(f"{what} was altered since {name} signed it; promote it again") from None
