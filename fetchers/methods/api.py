"""`api`: a JSON endpoint described by an `ApiSpec` (URL template, auth, pagination).

Some sources have an API that returns what the pages show; where one exists it is the
cheapest, most stable way (India's default order starts with it). The spec says:

- `url_template`: the endpoint, with `{url}` (the URL being fetched), `{page}` and any
  `vars` as placeholders; without one the URL itself is the endpoint;
- `auth_env`: the *name* of the environment variable holding the credential, sent as
  `auth_header: auth_scheme <value>`. The value is read at request time and is never
  logged, stored, put in an attempt or an error message, or echoed by `repr`;
- `headers`: extra headers; one that carries a credential (its name says auth, token, key,
  secret, cookie, session…) must be written `env:VARIABLE` and is read like `auth_env`;
- pagination: `none`, `page` (increment `{page}` until a page has no items or `max_pages`),
  or `next` (follow the URL at `next_path` in each answer), at most `max_pages` requests.
  Paginated results are combined into one JSON document
  `{"items": [...], "pages": <pages with items>, "requests": <requests made>}`.

The answer decides where `next` leads, and the credential goes with every request, so a
`next` link is followed only over http(s) and only to the API's own origin (scheme, host,
port) or to a host listed in `next_hosts` (over https, or the API's own scheme); anything
else fails the attempt as `invalid`, naming the link. Every page is bounded by the fetchers'
`max_page_bytes`, and so are the pages together.

Without an `ApiSpec` in the request the method is *unavailable* for it and the cascade
moves on — an API is a property of a source, not of every URL.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urljoin, urlsplit

from fetchers.errors import InvalidContent, MethodUnavailable, TooLarge
from fetchers.methods.base import FetchMethod, FetchRequest, RawResponse, Requirement
from fetchers.methods.http import CurlClient

if TYPE_CHECKING:
    from fetchers.config import FetchSettings

__all__ = ["ApiMethod", "ApiSpec", "dig"]

_SENSITIVE = re.compile(r"auth|token|secret|key|cookie|passw|session|signature", re.I)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ENV_PREFIX = "env:"


@dataclass(frozen=True, slots=True)
class ApiSpec:
    url_template: str | None = None
    auth_env: str | None = None  # NAME of the variable with the token, never the token
    auth_header: str = "Authorization"
    auth_scheme: str | None = "Bearer"  # None: send the value as is
    vars: Mapping[str, str] = field(default_factory=dict)
    pagination: Literal["none", "page", "next"] = "none"
    first_page: int = 1
    max_pages: int = 1
    items_path: str = "items"
    next_path: str = "next"
    # extra headers: literal values, or `env:VAR` (read at request time) for credentials
    headers: Mapping[str, str] = field(default_factory=dict)
    # hosts (`host` or `host:port`) a `next` link may lead to besides the API's own origin
    next_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.pagination not in ("none", "page", "next"):
            raise ValueError(f"pagination {self.pagination!r}: use none, page or next")
        if self.max_pages < 1:
            raise ValueError("max_pages must be at least 1")
        object.__setattr__(self, "next_hosts", tuple(h.strip().lower() for h in self.next_hosts))
        for name, value in self.headers.items():
            if value.startswith(_ENV_PREFIX):
                var = value[len(_ENV_PREFIX) :].strip()
                if not _ENV_NAME.fullmatch(var):
                    raise ValueError(
                        f"header {name!r} = env:{var}: {var!r} is not an environment variable name"
                    )
                continue
            secret_name = name.lower() in ("authorization", "cookie", self.auth_header.lower())
            if secret_name or _SENSITIVE.search(name):
                raise ValueError(
                    f"header {name!r} carries a secret: a literal value would be stored and "
                    f'shown; read it from the environment instead: "{name}" = "env:VARIABLE" '
                    "(or auth_env for the Authorization header)"
                )

    def render(self, url: str, page: int) -> str:
        if not self.url_template:
            return url
        try:
            return self.url_template.format(url=url, page=page, **self.vars)
        except (KeyError, IndexError) as exc:
            raise InvalidContent(f"api: url_template needs a value for {exc}") from None


def dig(doc: Any, path: str) -> Any:
    """The value at a dotted path (`data.items`, `items.0.id`); None when absent."""
    for key in filter(None, path.split(".")):
        if isinstance(doc, Mapping):
            doc = doc.get(key)
        elif isinstance(doc, list) and key.isdigit() and int(key) < len(doc):
            doc = doc[int(key)]
        else:
            return None
    return doc


class ApiMethod(FetchMethod):
    name = "api"

    def __init__(self, settings: FetchSettings) -> None:
        super().__init__(settings)
        self.client = CurlClient(settings, max_clients=min(32, settings.http_max_clients))

    def requirements(self) -> list[Requirement]:
        return [Requirement("curl_cffi (JSON endpoints)", "python", "curl_cffi", "pip: curl_cffi")]

    def _headers(self, spec: ApiSpec) -> tuple[dict[str, str], tuple[str, ...]]:
        """The request headers with credentials read from the environment, and those values
        (to scrub from error messages)."""
        headers = {"Accept": "application/json", "User-Agent": "fetchfleet/0.1"}
        secrets: list[str] = []
        for name, value in spec.headers.items():
            if value.startswith(_ENV_PREFIX):
                value = _from_env(value[len(_ENV_PREFIX) :].strip(), f"the {name} header")
                secrets.append(value)
            headers[name] = value
        if spec.auth_env:
            token = _from_env(spec.auth_env, "the API credential")
            secrets.append(token)
            headers[spec.auth_header] = f"{spec.auth_scheme} {token}" if spec.auth_scheme else token
        return headers, tuple(secrets)

    async def fetch(self, request: FetchRequest) -> RawResponse:
        self.check_available()
        spec = request.api
        if spec is None:
            raise MethodUnavailable("api: no API is described for this source (pass api=ApiSpec)")
        headers, secrets = self._headers(spec)
        page, url = spec.first_page, spec.render(request.url, spec.first_page)
        origin = _origin(url)
        if origin is None:
            raise InvalidContent(f"api: {_clip(url)} is not an http(s) URL")
        limit = request.max_bytes or self.settings.max_page_bytes
        total = 0
        items: list[Any] = []
        pages = requests = 0
        last: RawResponse | None = None
        while True:
            last = await self.client.request(
                replace(request, url=url, headers={}, user_agent=None),
                headers=headers,
                impersonate=False,
                secrets=secrets,
            )
            requests += 1
            total += len(last.content)
            if total > limit:
                raise TooLarge(
                    f"api: {requests} pages together are over {_limit_name(request)} "
                    f"{limit:,} ({total:,} bytes): lower max_pages or raise the limit",
                    limit=limit,
                    received=total,
                    status=last.status,
                    headers=last.headers,
                )
            if spec.pagination == "none" or not 200 <= last.status < 300:
                return last
            try:
                doc = json.loads(last.content)
            except ValueError:
                return last  # the validator says "not JSON"
            found = dig(doc, spec.items_path)
            batch = found if isinstance(found, list) else []
            items.extend(batch)
            pages += bool(batch)
            if requests >= spec.max_pages:
                break
            if spec.pagination == "page":
                if not batch:
                    break
                page += 1
                url = spec.render(request.url, page)
            else:
                nxt = dig(doc, spec.next_path)
                if not nxt:
                    break
                url = urljoin(url, str(nxt))
                _check_next(url, origin, spec)
        body = json.dumps({"items": items, "pages": pages, "requests": requests}).encode()
        return RawResponse(
            status=last.status,
            content=body,
            headers={**last.headers, "content-type": "application/json"},
            final_url=last.final_url,
        )

    async def aclose(self) -> None:
        await self.client.aclose()


def _from_env(var: str, what: str) -> str:
    value = os.environ.get(var)
    if not value:
        raise MethodUnavailable(f"api: the environment variable {var} ({what}) is not set")
    return value


def _clip(text: str, n: int = 120) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _limit_name(request: FetchRequest) -> str:
    return "max_bytes" if request.max_bytes else "max_page_bytes (FETCHFLEET_MAX_PAGE_BYTES)"


def _origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an http(s) URL, else None."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


def _check_next(url: str, origin: tuple[str, str, int], spec: ApiSpec) -> None:
    """Refuse a `next` link the credential must not follow (see the module doc)."""
    target = _origin(url)
    if target == origin:
        return
    if target is not None and target[0] in ("https", origin[0]):
        _, host, port = target
        if host in spec.next_hosts or f"{host}:{port}" in spec.next_hosts:
            return
    raise InvalidContent(
        f"api: the next link {_clip(url)!r} leaves the API's origin "
        f"({origin[0]}://{origin[1]}:{origin[2]}): not followed, the credential stays; "
        "list its host in the spec's next_hosts to allow it (http(s) only)"
    )
