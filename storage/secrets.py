"""Encryption at rest for the few secrets the pool must keep (proxy passwords).

A proxy's password is needed again whenever the proxy is used, so it cannot be dropped; it is
stored as a Fernet token (AES + HMAC, from ``cryptography``), as Airflow does for connection
passwords. The key comes from ``FETCHFLEET_SECRET_KEY`` or a key file created on first use
(mode 0600). Every machine of a distributed deployment needs the same key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from storage.errors import StorageError


@dataclass(frozen=True)
class SecretBox:
    fernet: Fernet

    @classmethod
    def load(cls, key: str | None, key_file: Path) -> SecretBox:
        if key:
            return cls(Fernet(key.encode()))
        if key_file.exists():
            return cls(Fernet(key_file.read_bytes().strip()))
        key_file.parent.mkdir(parents=True, exist_ok=True)
        new = Fernet.generate_key()
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(new)
        return cls(Fernet(new))

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
