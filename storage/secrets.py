"""Encryption at rest for the few secrets the pool must keep (proxy passwords).

A proxy's password is needed again whenever the proxy is used, so it cannot be dropped; it is
stored as a Fernet token (AES + HMAC, from ``cryptography``), as Airflow does for connection
passwords. The key comes from ``FETCHFLEET_SECRET_KEY`` or a key file created on first use
(mode 0600). Every machine of a distributed deployment needs the same key.

The key file is created atomically: the key is written whole to a private temporary file
beside it, which is then hard-linked into place (`link` fails if the name exists, like
O_EXCL). Two first uses at once (the console and a CLI run) thus end with one key, the
loser reading the winner's, never a half-written file. Making a new key is logged as a
warning: proxies stored under another key cannot be decrypted with it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from storage.errors import StorageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecretBox:
    fernet: Fernet

    @classmethod
    def load(cls, key: str | None, key_file: Path) -> SecretBox:
        if key:
            return cls(Fernet(key.encode()))
        if key_file.exists():
            return cls(Fernet(_read_key(key_file)))
        return cls(Fernet(_create_key(key_file)))

    def encrypt(self, value: str | None) -> str | None:
        return None if value is None else self.fernet.encrypt(value.encode()).decode()

    def decrypt(self, token: str | None) -> str | None:
        if token is None:
            return None
        try:
            return self.fernet.decrypt(token.encode()).decode()
        except InvalidToken:
            raise StorageError(
                "a stored proxy password cannot be decrypted with this machine's key: set "
                "FETCHFLEET_SECRET_KEY (or copy data/secret.key) to the key used when the "
                "proxies were imported"
            ) from None


def _read_key(key_file: Path) -> bytes:
    data = key_file.read_bytes().strip()
    if not data:
        raise StorageError(
            f"the secret key file {key_file.resolve()} is empty: restore it from a backup or "
            "set FETCHFLEET_SECRET_KEY to the key used when the proxies were imported"
        )
    return data


def _create_key(key_file: Path) -> bytes:
    """A new key at ``key_file``, or the key another process put there first."""
    key_file.parent.mkdir(parents=True, exist_ok=True)
    new = Fernet.generate_key()
    fd, tmp = tempfile.mkstemp(prefix=f".{key_file.name}.", dir=key_file.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(new)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, key_file)
        except FileExistsError:
            return _read_key(key_file)  # another process won the race: use its key
    finally:
        os.unlink(tmp)
    log.warning(
        "created a new secret key at %s: proxy passwords stored under another key "
        "(another machine, another working directory) cannot be decrypted with it; to share "
        "one key, copy that file or set FETCHFLEET_SECRET_KEY on every machine",
        key_file.resolve(),
        extra={"key_file": str(key_file.resolve())},
    )
    return new
