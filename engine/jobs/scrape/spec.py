"""The scrape spec: a TOML file that says what to fetch, what to follow and what to extract.

```toml
name = "malaysia_pharmacy"
country = "Malaysia"            # or several [[sources]] with their own country
entity_type = "product"
start_urls = ["https://shop.example/catalog?page=1"]   # or start_urls_file = "urls.txt"
methods = ["http", "playwright"]   # optional: this spec's fetch order (else the country's)
max_pages = 5000                   # optional cap on the pages of one run
id_field = "id"                    # the field that is the entity's external id
robots = "obey"                    # or "ignore": robots.txt Disallow and Crawl-delay
robots_agent = "fetchfleet"        # the User-agent token matched in robots.txt groups

[follow]                           # optional: which links to follow
css = ["a.next", "a.product-link"]
regex = []                         # regexes on every <a href> (absolute, no fragment)
max_depth = 10
same_domain = true

[[extract]]                        # one or more; the first whose `match` fits the URL is used
match = "/catalog"                 # optional regex on the page URL
list = "li.product"                # optional: one entity per match (CSS; or list_xpath)
[extract.fields]
id = { attr = "data-id" }           # or { page = "url" }: the page's own URL (see below)
name = ".name"                     # a string is a CSS selector, its text
price = { css = ".price", type = "float" }
sku = { xpath = ".//span[@class='sku']/text()" }
link = { page = "final_url" }      # the page's URL after redirects ("url": as requested)

[validate]                         # optional: entities failing these are reported, not stored
required = ["id", "name", "price"]
patterns = { price = '^\\d+(\\.\\d+)?$' }

[fetch]                            # optional: what a good page looks like (else: next method)
required_selectors = ["main"]
min_length = 200

[api]                              # optional (also per [[sources]]): for the `api` method
url_template = "https://shop.example/api/products?page={page}"
auth_env = "SHOP_API_TOKEN"        # the variable's NAME; the token is never stored or logged
pagination = "page"                # none, page, next
max_pages = 50
# then [[extract]] json_list = "items" and fields with json = "path"

[[files]]                          # optional: files to download (PDFs, images)
css = "a.leaflet"
max_bytes = 5_000_000
```

Errors name the file, the line and column (TOML syntax) or the field path (`extract[0].fields.price.type`).
"""

from __future__ import annotations

import re
import string
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from engine import files
from fetchers.extract import PAGE_VALUES, TYPES, FieldRule

__all__ = [
    "ScrapeSpec",
    "SpecError",
    "load_spec",
    "normalize_url",
    "parse_spec",
    "read_spec_text",
    "read_start_urls",
]


class SpecError(ValueError):
    """A spec that cannot be used; the message says where and what to change."""


# RFC 3986: characters that never need an escape, and those a path or query may hold as
# written (the reserved ones among them keep the form they have: `%2F` is not `/`)
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_AS_WRITTEN = _UNRESERVED | frozenset("!$&'()*+,;=:@/?")
_HEX = frozenset(string.hexdigits)


def _escapes(text: str) -> str:
    """Each character of a path or query written one way (RFC 3986 6.2.2): an escape in
    upper case, or the unreserved character it stands for; a character a URL cannot hold
    (a space, non-ASCII) escaped as UTF-8. A ``%`` that starts no escape stays as written."""
    if "%" not in text and _AS_WRITTEN.issuperset(text):
        return text  # the common case: nothing to rewrite
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "%" and i + 2 < n and text[i + 1] in _HEX and text[i + 2] in _HEX:
            char = chr(int(text[i + 1 : i + 3], 16))
            out.append(char if char in _UNRESERVED else "%" + text[i + 1 : i + 3].upper())
            i += 3
            continue
        if c in _AS_WRITTEN or c == "%":
            out.append(c)
        else:
            out.append("".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass")))
        i += 1
    return "".join(out)


def _dot_segments(path: str) -> str:
    """``path`` with its ``.`` and ``..`` segments applied (RFC 3986 5.2.4), as a browser
    and the server do; never above the root."""
    if "." not in path or not path.startswith("/"):
        return path
    segments = path.split("/")
    out: list[str] = []
    for seg in segments[1:]:
        if seg == "..":
            if out:
                out.pop()
        elif seg != ".":
            out.append(seg)
    result = "/" + "/".join(out)
    if segments[-1] in (".", "..") and not result.endswith("/"):
        result += "/"
    return result


def normalize_url(url: str) -> str:
    """The registry key of a URL, one for each way of writing the same address: scheme and
    host lower-cased, default port and fragment dropped, an empty path made "/", ``.`` and
    ``..`` segments applied, every character written one way (``_escapes``: ``%7e``,
    ``%7E`` and ``~`` are ``~``; a space is ``%20``). The query keeps its order (it can be
    meaningful). Not merged: ``/dir/`` and ``/dir/index.html``, or paths differing in case
    (what they serve is the server's choice)."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    if port and not ((scheme == "http" and port == 80) or (scheme == "https" and port == 443)):
        host = f"{host}:{port}"
    if parts.username:
        userinfo = parts.username + (f":{parts.password}" if parts.password else "")
        host = f"{userinfo}@{host}"
    path = _dot_segments(_escapes(parts.path)) if parts.path else "/"
    return urlunsplit((scheme, host, path, _escapes(parts.query), ""))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FieldSpec(_Model):
    css: str | None = None
    xpath: str | None = None
    attr: str | None = None
    type: str = "str"
    regex: str | None = None
    all: bool = False
    sep: str = " | "
    # `json` in the spec; named so here because BaseModel.json is a (deprecated) method
    json_path: str | None = Field(None, alias="json")
    page: str | None = None  # "url" or "final_url": the page's own address, not its content

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _check(self) -> FieldSpec:
        if self.css and self.xpath:
            raise ValueError("give css or xpath, not both")
        if self.page is not None:
            if self.page not in PAGE_VALUES:
                raise ValueError(f"page {self.page!r}: use one of {', '.join(PAGE_VALUES)}")
            if self.css or self.xpath or self.attr or self.json_path:
                raise ValueError("page takes the page's address: give no css, xpath, attr, json")
        elif not (self.css or self.xpath or self.attr or self.json_path):
            raise ValueError("give css, xpath, attr, json or page")
        if self.type not in TYPES:
            raise ValueError(f"type {self.type!r}: use one of {', '.join(TYPES)}")
        if self.regex:
            re.compile(self.regex)
        if self.css:
            _check_css(self.css)
        if self.xpath:
            _check_xpath(self.xpath)
        return self


class ExtractSpec(_Model):
    match: str | None = None
    list: str | None = None
    list_xpath: str | None = None
    json_list: str | None = None  # where the entities are in an API answer (`items`)
    fields: dict[str, FieldSpec]

    @field_validator("fields", mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: {"css": x} if isinstance(x, str) else x for k, x in v.items()}
        return v

    @field_validator("match")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            re.compile(v)
        return v

    @field_validator("list")
    @classmethod
    def _css(cls, v: str | None) -> str | None:
        if v is not None:
            _check_css(v)
        return v

    def rules(self, kind: str = "html") -> list[FieldRule]:
        """The fields for HTML pages (css/xpath/attr), for API answers (json) or taken from
        the page's address (``kind="page"``)."""
        out = []
        for name, f in self.fields.items():
            d = f.model_dump()
            d["json"] = d.pop("json_path")
            if kind == "page":
                if f.page:
                    out.append(FieldRule(name=name, **d))
            elif kind == "json":
                if f.json_path:
                    d |= {"css": None, "xpath": None, "attr": None}
                    out.append(FieldRule(name=name, **d))
            elif f.css or f.xpath or f.attr:
                out.append(FieldRule(name=name, **{**d, "json": None}))
        return out


class FollowSpec(_Model):
    css: list[str] = Field(default_factory=list)
    regex: list[str] = Field(default_factory=list)
    max_depth: int = Field(10, ge=0, le=10_000)
    same_domain: bool = True

    @field_validator("css", "regex", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self) -> FollowSpec:
        for r in self.regex:
            re.compile(r)
        for c in self.css:
            _check_css(c)
        return self


class ValidateSpec(_Model):
    required: list[str] = Field(default_factory=list)
    patterns: dict[str, str] = Field(default_factory=dict)

    @field_validator("patterns")
    @classmethod
    def _regexes(cls, v: dict[str, str]) -> dict[str, str]:
        for name, pattern in v.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{name}: {exc}") from None
        return v


class FetchSpec(_Model):
    required_selectors: list[str] = Field(default_factory=list)
    min_length: int = Field(1, ge=0)
    timeout_s: float | None = Field(None, gt=0)


class FilesSpec(_Model):
    css: list[str]
    max_bytes: int = Field(10_000_000, ge=1)

    @field_validator("css", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class ApiConfig(_Model):
    """A JSON API of a source, for the `api` fetch method (see fetchers/methods/api.py)."""

    url_template: str | None = None  # {url} the page URL, {page} the page number
    auth_env: str | None = None  # the NAME of the variable holding the token
    auth_header: str = "Authorization"
    auth_scheme: str | None = "Bearer"
    pagination: str = "none"  # none, page, next
    first_page: int = 1
    max_pages: int = Field(1, ge=1, le=100_000)
    items_path: str = "items"
    next_path: str = "next"
    headers: dict[str, str] = Field(default_factory=dict)  # credentials as "env:VARIABLE"
    next_hosts: list[str] = Field(default_factory=list)  # where `next` may lead besides home

    @model_validator(mode="after")
    def _check(self) -> ApiConfig:
        self.to_api_spec()  # the method's own checks (pagination, secret-bearing headers)
        return self

    def to_api_spec(self) -> Any:
        from fetchers.methods.api import ApiSpec

        return ApiSpec(**self.model_dump())


class SourceSpec(_Model):
    country: str
    start_urls: list[str] = Field(default_factory=list)
    start_urls_file: str | None = None
    methods: list[str] | None = None
    api: ApiConfig | None = None


class ScrapeSpec(_Model):
    name: str
    entity_type: str = "entity"
    country: str | None = None
    start_urls: list[str] = Field(default_factory=list)
    start_urls_file: str | None = None
    sources: list[SourceSpec] = Field(default_factory=list)
    methods: list[str] | None = None
    api: ApiConfig | None = None
    max_pages: int | None = Field(None, ge=1)
    id_field: str = "id"
    robots: Literal["obey", "ignore"] = "obey"
    robots_agent: str = Field("fetchfleet", min_length=1, max_length=100, pattern=r"^[\w.-]+$")
    follow: FollowSpec = Field(default_factory=FollowSpec)
    extract: list[ExtractSpec] = Field(default_factory=list)
    validate_: ValidateSpec = Field(default_factory=ValidateSpec, alias="validate")
    fetch: FetchSpec = Field(default_factory=FetchSpec)
    files: list[FilesSpec] = Field(default_factory=list)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _check(self) -> ScrapeSpec:
        if not self.sources and not self.country:
            raise ValueError("give `country` (with start_urls) or one or more [[sources]]")
        if not self.sources and not (self.start_urls or self.start_urls_file):
            raise ValueError("give start_urls = [...] or start_urls_file = 'FILE'")
        if self.extract and not any(self.id_field in e.fields for e in self.extract):
            raise ValueError(f"id_field {self.id_field!r} is not a field of any [[extract]]")
        if self.methods is not None:
            from fetchers.cascade import parse_methods

            parse_methods(self.methods)
        return self

    def all_sources(self) -> list[SourceSpec]:
        """The sources, the top-level shorthand included."""
        if not (self.country and (self.start_urls or self.start_urls_file)):
            return list(self.sources)
        shorthand = SourceSpec(
            country=self.country,
            start_urls=self.start_urls,
            start_urls_file=self.start_urls_file,
            methods=self.methods,
            api=self.api,
        )
        return [shorthand, *self.sources]

    def extract_for(self, url: str) -> ExtractSpec | None:
        for e in self.extract:
            if e.match is None or re.search(e.match, url):
                return e
        return None


def _check_css(selector: str) -> None:
    from cssselect import GenericTranslator, SelectorError

    try:
        GenericTranslator().css_to_xpath(selector)
    except SelectorError as exc:
        raise ValueError(f"CSS selector {selector!r}: {exc}") from None


def _check_xpath(path: str) -> None:
    from lxml import etree

    try:
        etree.XPath(path)
    except etree.XPathSyntaxError as exc:
        raise ValueError(f"XPath {path!r}: {exc}") from None


def _where(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + ("validate" if part == "validate_" else str(part))
    return out or "spec"


def parse_spec(text: str, source: str = "spec") -> ScrapeSpec:
    """A spec from TOML text; SpecError says what is wrong and where."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        if "end of document" in msg:  # an unclosed [ { or quote: say where the file ends
            msg += f" (line {len(text.splitlines())}: is a bracket or a quote left open?)"
        raise SpecError(f"{source}: not valid TOML: {msg}") from None
    try:
        return ScrapeSpec.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (see the spec format in README.md, 'Scrape specs')"
            problems.append(f"{_where(tuple(err['loc']))}: {msg}")
        raise SpecError(f"{source}: " + "; ".join(problems)) from None


def read_spec_text(path: str | Path, allowed_roots: Iterable[str | Path] | None = None) -> str:
    """A spec file's text, bounded (``engine.files``): a regular file of at most
    ``MAX_SPEC_BYTES``, under ``allowed_roots`` when given."""
    try:
        return files.read_text_bounded(path, files.MAX_SPEC_BYTES, allowed_roots, "spec file")
    except files.FileRefused as exc:
        raise SpecError(str(exc)) from None


def load_spec(path: str | Path, allowed_roots: Iterable[str | Path] | None = None) -> ScrapeSpec:
    return parse_spec(read_spec_text(path, allowed_roots), str(path))


def read_start_urls(
    source: SourceSpec, base_dir: Path, allowed_roots: Iterable[str | Path] | None = None
) -> list[str]:
    """The source's start URLs, inline and from its file (one a line, # comments), checked.

    The file is read bounded (``engine.files``; under ``allowed_roots`` when given); a bad
    line of it is quoted only as a short, sanitized excerpt."""
    urls = [(u, f"start URL {i} ({u!r})") for i, u in enumerate(source.start_urls, 1)]
    if source.start_urls_file:
        path = Path(source.start_urls_file)
        if not path.is_absolute():
            path = base_dir / path
        try:
            text = files.read_text_bounded(
                path, files.MAX_START_URLS_BYTES, allowed_roots, "start_urls_file"
            )
        except files.FileRefused as exc:
            raise SpecError(str(exc)) from None
        for n, line in enumerate(text.splitlines(), 1):
            s = line.strip()
            if s and not s.startswith("#"):
                urls.append((s, f"start_urls_file {path} line {n} ({files.excerpt(s)})"))
    for u, where in urls:
        parts = urlsplit(u)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SpecError(f"{where} of {source.country}: not an http(s) URL")
    return [u for u, _ in urls]
