"""Who may use the gateway, and what a client asks for through its proxy username.

Credentials come from an environment variable (`--auth-env NAME`, value `user:password`),
never from the command line (it shows in `ps`). The username may carry routing choices, as
commercial gateways do::

    user                               any member
    user-country-MY                    a member in Malaysia
    user-country-MY-session-abc        the same member for every request of session "abc"
    user-session-abc                   sticky, any country

Without configured credentials any username is accepted (its password ignored), so the
choices work on a loopback gateway too.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Credentials:
    user: str
    password: str

    @classmethod
    def from_env(cls, name: str, environ: dict[str, str] | None = None) -> Credentials:
        value = (environ if environ is not None else os.environ).get(name, "")
        user, sep, password = value.partition(":")
        if not sep or not user or not password:
            raise ValueError(
                f"--auth-env {name}: set {name}=user:password in the environment (both parts "
                "non-empty; the user name may not contain '-')"
            )
        if "-" in user:
            raise ValueError(f"--auth-env {name}: the user name may not contain '-'")
        return cls(user, password)


@dataclass(frozen=True, slots=True)
class Routing:
    """What one request asked for: a country (ISO code, upper case) and a sticky session."""

    country: str | None = None
    session: str | None = None


ANY = Routing()
MAX_SESSION_CHARS = 64


def parse_username(username: str) -> tuple[str, Routing]:
    """'user-country-MY-session-abc' → ('user', Routing('MY', 'abc')); unknown or malformed
    options raise ValueError (the client gets 407/a failed login, not a silent default)."""
    base, *rest = username.split("-")
    country = session = None
    if len(rest) % 2:
        raise ValueError(f"proxy username {username!r}: options come in name-value pairs")
    for key, value in zip(rest[::2], rest[1::2], strict=True):
        key = key.lower()
        if key == "country" and len(value) == 2 and value.isalpha():
            country = value.upper()
        elif key == "session" and 0 < len(value) <= MAX_SESSION_CHARS:
            session = value
        else:
            raise ValueError(f"proxy username {username!r}: bad option {key!r}")
    return base, Routing(country, session)


def basic_credentials(header: str | None) -> tuple[str, str] | None:
    """The (user, password) of a `Proxy-Authorization: Basic …` header, else None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        raw = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = raw.partition(":")
    return (user, password) if sep else None


class Authenticator:
    """Checks a client's credentials and returns its routing; None when refused."""

    def __init__(self, credentials: Credentials | None) -> None:
        self.credentials = credentials

    @property
    def required(self) -> bool:
        return self.credentials is not None

    def check(self, user: str | None, password: str | None) -> Routing | None:
        if user is None:
            return None if self.credentials else ANY
        try:
            base, routing = parse_username(user)
        except ValueError:
            return None
        c = self.credentials
        if c is None:
            return routing
        same_user = hmac.compare_digest(base.encode(), c.user.encode())
        same_pw = hmac.compare_digest((password or "").encode(), c.password.encode())
        return routing if same_user and same_pw else None
