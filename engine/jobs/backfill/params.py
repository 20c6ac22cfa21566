"""The ``backfill`` kind's parameters: the one place for their bounds, defaults and flags,
and the parsers of its values (headers, the URL template, the rate limit) that need no I/O.

Secrets: ``--header 'Authorization=env:API_TOKEN'`` keeps the variable's *name*; a literal
value for a header that looks like a credential is refused (it would be stored with the run).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self
from urllib.parse import urlsplit

from pydantic import field_serializer, field_validator, model_validator

from engine.jobs.params import ParamError, TaskParams, param, timeout_param
from engine.ratelimit.base import Rate

_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SENSITIVE = re.compile(r"auth|token|secret|key|cookie|passw|session|signature", re.I)
_PLACEHOLDER = re.compile(r"\{[^}]*\}")
DEFAULT_MAX_BODY_BYTES = 10 * 2**20  # an old run's, stored before the parameter existed


@dataclass(frozen=True, slots=True)
class HeaderSpec:
    name: str
    value: str | None = None  # a literal (stored with the run; never a credential)
    env: str | None = None  # the name of an environment variable read by each worker

    def to_json(self) -> dict[str, str]:
        return (
            {"name": self.name, "env": self.env}
            if self.env
            else {"name": self.name, "value": self.value or ""}
        )


def _header_error(message: str, value: str) -> ParamError:
    return ParamError(message, "headers", flag="--header", value=value)


def parse_header(text: str, environ: Mapping[str, str] = os.environ) -> HeaderSpec:
    """``Name=value`` or ``Name=env:VAR`` (VAR must be set here)."""
    name, sep, value = (text or "").partition("=")
    name = name.strip()
    if not sep or not _HEADER_NAME.fullmatch(name):
        raise _header_error(
            "write Name=value or Name=env:VAR, e.g. --header 'Authorization=env:API_TOKEN'",
            repr(text),
        )
    if value.startswith("env:"):
        var = value[4:].strip()
        if not _ENV_NAME.fullmatch(var):
            raise _header_error(f"{var!r} is not an environment variable name", f"{name}=env:{var}")
        if var not in environ:
            raise _header_error(
                f"the environment variable {var} is not set; export {var}=… first (each "
                "worker reads it from its own environment)",
                f"{name}=env:{var}",
            )
        return HeaderSpec(name=name, env=var)
    if "\r" in value or "\n" in value:
        raise _header_error("a header value cannot contain line breaks", f"{name}=…")
    if _SENSITIVE.search(name):
        raise _header_error(
            "a literal value would be stored with the run; pass it from the environment "
            f"instead: --header '{name}=env:VARIABLE'",
            f"{name}=…",
        )
    return HeaderSpec(name=name, value=value)


def check_url_template(template: str) -> str:
    """The origin (``scheme://host:port``) of a valid template, the default limiter key."""

    def error(message: str, value: str | None = repr(template)) -> ParamError:
        return ParamError(message, "url_template", flag="--url-template", value=value)

    if not template or "{id}" not in template:
        raise error("put {id} where the ID goes, e.g. 'https://api.example.com/users/{id}'")
    others = {p for p in _PLACEHOLDER.findall(template) if p != "{id}"}
    if others:
        raise error(f"only {{id}} is substituted; remove {', '.join(sorted(others))}", None)
    parts = urlsplit(template.replace("{id}", "x"))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise error("must be an http:// or https:// URL with a host")
    try:
        port = parts.port
    except ValueError:
        raise error("the port is not a number") from None
    default = 443 if parts.scheme == "https" else 80
    return f"{parts.scheme}://{parts.hostname.lower()}:{port or default}"


class BackfillParams(TaskParams):
    """An ID list, where each ID's record is, and the limit the API states."""

    kind = "backfill"
    stop_metrics = ("error_ratio", "http_429", "no_progress")
    default_stop_rules = ("error_ratio>0.5/200", "http_429>20/10m", "no_progress>15m")

    ids_file: str = param(
        description="IDs, one a line (or a CSV with --id-column)",
        flag="--ids",
        metavar="FILE",
        missing="no IDs: give --ids FILE (one ID a line, or a CSV with --id-column)",
    )
    id_column: str | None = param(None, description="the ID column of a CSV file", metavar="NAME")
    id_pattern: str | None = param(
        None, description="IDs must match this (others are malformed lines)", metavar="REGEX"
    )
    url_template: str = param(
        description="where an ID's record is, with {id}: 'https://api.example.com/users/{id}'",
        metavar="URL",
        missing="no URL template: give the API's URL with {id} where the ID goes",
    )
    rate_limit: str = param(
        description="at most N requests in any window of PERIOD, across all workers: "
        "3000/5m, 10/1s",
        metavar="N/PERIOD",
        missing="no rate limit: give N/period (e.g. 3000/5m); the API's own limit, or below it",
    )
    burst: int = param(
        1, description="requests allowed at once within the limit", label="the burst", ge=1
    )
    rate_margin_s: float | None = param(
        None,
        description="how late a request may reach the API after its slot and still count in "
        "the right window (default: measured as the run goes, at least 0.5% of the period); "
        "a fixed value is used as given",
        flag="--rate-margin",
        metavar="SECONDS",
        label="the rate margin",
        unit="seconds",
        ge=0,
    )
    rate_key: str | None = param(
        None,
        description="runs with the same key share one limit (default: the API's "
        "scheme://host:port)",
    )
    headers: tuple[HeaderSpec, ...] = param(
        (),
        description="request header, repeatable; NAME=env:VAR reads VAR in each worker and "
        "stores only its name: --header 'Authorization=env:API_TOKEN'",
        flag="--header",
        metavar="NAME=VALUE",
        multiple=True,
    )
    timeout_s: float = timeout_param(10.0, "seconds per request")
    item_attempts: int = param(
        3, description="requests per ID before it fails", label="requests per ID", ge=1, le=20
    )
    max_body_bytes: int | None = param(
        None,
        description="largest answer read (default FETCHFLEET_MAX_PAGE_BYTES, 10 MiB); a "
        "larger one is stored as too_large, not retried",
        metavar="N",
        label="the largest body",
        unit="bytes",
        ge=1,
    )
    retry_backoff_s: float = param(
        0.5, description="first retry delay of an ID; it doubles after", cli=False, ge=0
    )

    @field_validator("id_pattern")
    @classmethod
    def _regex(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ParamError(
                f"not a regular expression ({exc})", "id_pattern", value=repr(pattern)
            ) from None
        return pattern

    @field_validator("url_template")
    @classmethod
    def _template(cls, template: str) -> str:
        template = template.strip()
        check_url_template(template)
        return template

    @field_validator("rate_limit")
    @classmethod
    def _rate(cls, text: str) -> str:
        Rate.parse(text.strip())  # the shape; the burst and the margin are checked below
        return text.strip()

    @field_validator("headers", mode="before")
    @classmethod
    def _headers(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [line for line in value.splitlines() if line.strip()]
        return tuple(
            parse_header(h.strip())
            if isinstance(h, str)
            else HeaderSpec(**h)
            if isinstance(h, dict)
            else h
            for h in value or ()
        )

    @field_serializer("headers")
    def _stored_headers(self, headers: tuple[HeaderSpec, ...]) -> list[dict[str, str]]:
        return [h.to_json() for h in headers]

    @model_validator(mode="after")
    def _rate_with_burst(self) -> Self:
        try:
            self.rate()
        except ValueError as exc:
            raise ParamError(str(exc), "rate_limit") from None
        return self

    def rate(self) -> Rate:
        return Rate.parse(self.rate_limit, burst=self.burst, jitter_s=self.rate_margin_s)

    def origin(self) -> str:
        """``scheme://host:port`` of the API: the default key of the shared limit."""
        return check_url_template(self.url_template)
