"""`api`: a JSON endpoint described by an `ApiSpec` (URL template, auth, pagination).

Some sources have an API that returns what the pages show; where one exists it is the
cheapest, most stable way (India's default order starts with it). The spec says:

- `url_template`: the endpoint, with `{url}` (the URL being fetched), `{page}` and any
  `vars` as placeholders; without one the URL itself is the endpoint;
- `auth_env`: the *name* of the environment variable holding the credential, sent as
  `auth_header: auth_scheme <value>`. The value is read at request time and is never
  logged, stored, put in an attempt or an error message, or echoed by `repr`;
- pagination: `none`, `page` (increment `{page}` until a page has no items or `max_pages`),
  or `next` (follow the URL at `next_path` in each answer), at most `max_pages` requests.
  Paginated results are combined into one JSON document
  `{"items": [...], "pages": <pages with items>, "requests": <requests made>}`.

Without an `ApiSpec` in the request the method is *unavailable* for it and the cascade
moves on — an API is a property of a source, not of every URL.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urljoin

from fetchers.errors import InvalidContent, MethodUnavailable
from fetchers.methods.base import FetchMethod, FetchRequest, RawResponse, Requirement
from fetchers.methods.http import CurlClient

if TYPE_CHECKING:
    from fetchers.config import FetchSettings

__all__ = ["ApiMethod", "ApiSpec", "dig"]


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
    headers: Mapping[str, str] = field(default_factory=dict)  # non-secret extra headers

    def __post_init__(self) -> None:
        if self.pagination not in ("none", "page", "next"):
            raise ValueError(f"pagination {self.pagination!r}: use none, page or next")
        if self.max_pages < 1:
            raise ValueError("max_pages must be at least 1")
        for name in self.headers:
            if name.lower() in ("authorization", "cookie", self.auth_header.lower()):
                raise ValueError(
                    f"header {name!r} carries a secret: give the variable's name in auth_env"
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

    def _auth(self, spec: ApiSpec) -> tuple[dict[str, str], str | None]:
        if not spec.auth_env:
            return {}, None
        token = os.environ.get(spec.auth_env)
        if not token:
            raise MethodUnavailable(
                f"api: the environment variable {spec.auth_env} (the API credential) is not set"
            )
        value = f"{spec.auth_scheme} {token}" if spec.auth_scheme else token
        return {spec.auth_header: value}, token

    async def fetch(self, request: FetchRequest) -> RawResponse:
        self.check_available()
        spec = request.api
        if spec is None:
            raise MethodUnavailable("api: no API is described for this source (pass api=ApiSpec)")
        auth, token = self._auth(spec)
        headers = {"Accept": "application/json", "User-Agent": "fetchfleet/0.1", **spec.headers}
        headers.update(auth)
        page, url = spec.first_page, spec.render(request.url, spec.first_page)
        items: list[Any] = []
        pages = requests = 0
        last: RawResponse | None = None
        while True:
            last = await self.client.request(
                replace(request, url=url, headers={}, user_agent=None),
                headers=headers,
                impersonate=False,
                secrets=(token,),
            )
            requests += 1
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
        body = json.dumps({"items": items, "pages": pages, "requests": requests}).encode()
        return RawResponse(
            status=last.status,
            content=body,
            headers={**last.headers, "content-type": "application/json"},
            final_url=last.final_url,
        )

    async def aclose(self) -> None:
        await self.client.aclose()
