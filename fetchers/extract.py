"""Field extraction from HTML: CSS or XPath per field, a list selector for many entities a page.

Two backends behind one interface (`Extractor`): selectolax (the Lexbor engine, CSS only)
when every selector of a spec is CSS, since it parses a catalog page several times faster
than lxml; lxml with cssselect-compiled XPath as soon as one field needs XPath. Selectors are
compiled once per spec, not per page.

A field rule: `css` or `xpath` (relative to the list item when the spec has `list`), `attr`
(an attribute instead of the text; with neither selector, the attribute of the list item or
page itself), `type` (str, int, float, bool, url), `regex` (keep the first group / match),
`all` (every match, joined by `sep`). Text is stored stripped, each run of whitespace
(Unicode's: the no-break space too) one space (`clean_text`). Values that do not convert
make the entity invalid with a reason; the caller reports it instead of storing it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urljoin

__all__ = [
    "PAGE_VALUES",
    "Extractor",
    "FieldRule",
    "Invalid",
    "JsonExtractor",
    "Row",
    "make_extractor",
]

TYPES = ("str", "int", "float", "bool", "url")
PAGE_VALUES = ("url", "final_url")  # what a `page` field can be
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_TRUE = {"1", "true", "yes", "y", "on", "in stock", "available"}
_FALSE = {"0", "false", "no", "n", "off", "out of stock", "unavailable"}


@dataclass(frozen=True, slots=True)
class FieldRule:
    name: str
    css: str | None = None
    xpath: str | None = None
    attr: str | None = None
    type: str = "str"
    regex: str | None = None
    all: bool = False
    sep: str = " | "
    json: str | None = None  # dotted path in an API answer's item (`price`, `offer.price`)
    page: str | None = None  # the page's own "url" or "final_url" (after redirects)


class Invalid(ValueError):
    """A value did not convert to its field's type."""


def clean_text(text: str) -> str:
    """A value as stored: stripped, every run of whitespace one space. Unicode whitespace
    counts (the no-break space of ``&nbsp;``, an em space), always: only collapsing runs
    that held an ASCII space or newline made ``1.&nbsp; What`` lose its no-break space and
    ``1.&nbsp;What`` keep it (the PostgreSQL docs' titles have both)."""
    return " ".join(text.split())


def convert(rule: FieldRule, raw: str | None, base_url: str) -> str | None:
    """The stored text of a value of ``rule.type`` (None stays None); raises Invalid."""
    if raw is None:
        return None
    value = clean_text(raw)
    if rule.regex:
        m = re.search(rule.regex, value)
        if not m:
            return None
        value = m.group(1) if m.groups() else m.group(0)
    if rule.type == "str":
        return value
    if rule.type == "url":
        if not value:
            return None
        try:
            return urljoin(base_url, value)
        except ValueError as exc:  # an unclosed IPv6 host: the value, not the page, is bad
            raise Invalid(f"{rule.name}: {value!r} is not a URL ({exc})") from None
    if rule.type == "bool":
        low = value.lower()
        if low in _TRUE:
            return "true"
        if low in _FALSE:
            return "false"
        raise Invalid(f"{rule.name}: {value!r} is not a yes/no value")
    m = _NUMBER.search(value)
    if not m:
        raise Invalid(f"{rule.name}: no number in {value!r}")
    number = m.group(0).replace(",", "")
    if rule.type == "int":
        try:
            return str(int(float(number)))
        except ValueError:
            raise Invalid(f"{rule.name}: {value!r} is not an integer") from None
    return repr(float(number)) if "." not in number else number


# One entity: field → converted value (None when absent), and what did not convert (or None).
Row = tuple[dict[str, str | None], str | None]


class Extractor(Protocol):
    def extract(self, content: bytes, url: str) -> list[Row]:
        """One row per entity (per list item, or one for the page)."""
        ...

    def links(self, content: bytes, url: str) -> list[str]:
        """Absolute URLs of the elements the spec follows, plus every link whose absolute
        URL without its fragment matches one of its regexes; a link that does not parse is
        returned as written (never raised)."""
        ...

    def hrefs(self, content: bytes, url: str, selectors: Sequence[str]) -> list[str]:
        """Absolute URLs (href, else src) of elements matching CSS ``selectors``."""
        ...


class JsonExtractor:
    """Entities from a JSON answer (the `api` method): the list at `list_path` (or the
    document itself), each field at its `json` path; fields without one are None."""

    def __init__(self, fields: Sequence[FieldRule], list_path: str | None) -> None:
        self.fields = tuple(fields)
        self.list_path = list_path

    def extract(self, content: bytes, url: str) -> list[Row]:
        import json

        from fetchers.methods.api import dig

        try:
            doc = json.loads(content)
        except ValueError:
            return []
        items = dig(doc, self.list_path) if self.list_path else doc
        if not isinstance(items, list):
            items = [items] if isinstance(items, dict) else []
        out = []
        for item in items:
            raws = []
            for rule in self.fields:
                v = dig(item, rule.json) if rule.json else None
                if isinstance(v, bool):
                    v = "true" if v else "false"
                raws.append(None if v is None else v if isinstance(v, str) else json.dumps(v))
            out.append(_row(self.fields, raws, url))
        return out

    def links(self, content: bytes, url: str) -> list[str]:
        return []

    def hrefs(self, content: bytes, url: str, selectors: Sequence[str]) -> list[str]:
        return []


def make_extractor(
    fields: Sequence[FieldRule],
    list_selector: str | None = None,
    list_xpath: str | None = None,
    follow_css: Sequence[str] = (),
    follow_regex: Sequence[str] = (),
) -> Extractor:
    if list_xpath or any(f.xpath for f in fields):
        return LxmlExtractor(fields, list_selector, list_xpath, follow_css, follow_regex)
    return LexborExtractor(fields, list_selector, follow_css, follow_regex)


def _join(base: str, href: str) -> str:
    """``href`` resolved against ``base``; as written when it does not parse (an unclosed
    IPv6 host): a page's links are its author's input, and callers check each one."""
    try:
        return urljoin(base, href)
    except ValueError:
        return href


def _first_group_links(urls: Iterable[str | None], base: str) -> list[str]:
    out = []
    for href in urls:
        if href and not href.startswith(("javascript:", "mailto:", "tel:", "#")):
            out.append(_join(base, href.strip()))
    return out


class _HtmlExtractor:
    """What both HTML backends share: the follow rules, one parse per page (extract, links
    and hrefs of one page reuse it), link resolution. Subclasses parse and select."""

    def __init__(self, follow_css: Sequence[str], follow_regex: Sequence[str]) -> None:
        self.follow_css = tuple(follow_css)
        self.follow_regex = tuple(re.compile(r) for r in follow_regex)
        # (content, tree): holding the content itself, an identity match cannot be a
        # recycled id
        self._cache: tuple[bytes, Any] | None = None

    def _parse(self, content: bytes) -> Any:
        raise NotImplementedError

    def _anchor_hrefs(self, tree: Any) -> list[str]:
        """Every <a href> of the page."""
        raise NotImplementedError

    def _attr_hrefs(self, tree: Any, selector: str) -> list[str | None]:
        """href (else src) of the elements matching a CSS selector."""
        raise NotImplementedError

    def _tree(self, content: bytes) -> Any:
        if self._cache is not None and self._cache[0] is content:
            return self._cache[1]
        tree = self._parse(content)
        self._cache = (content, tree)
        return tree

    def links(self, content: bytes, url: str) -> list[str]:
        out = self.hrefs(content, url, self.follow_css) if self.follow_css else []
        if self.follow_regex:
            for href in self._anchor_hrefs(self._tree(content)):
                # matched as it will be fetched: a fragment never reaches the server
                # (`\.html$` must follow `b.html#sec`)
                if href and any(
                    r.search(_join(url, href).split("#", 1)[0]) for r in self.follow_regex
                ):
                    out.extend(_first_group_links([href], url))
        return out

    def hrefs(self, content: bytes, url: str, selectors: Sequence[str]) -> list[str]:
        tree = self._tree(content)
        return _first_group_links(
            [h for sel in selectors for h in self._attr_hrefs(tree, sel)], url
        )


class LexborExtractor(_HtmlExtractor):
    def __init__(
        self,
        fields: Sequence[FieldRule],
        list_selector: str | None,
        follow_css: Sequence[str],
        follow_regex: Sequence[str],
    ) -> None:
        from selectolax.lexbor import LexborHTMLParser

        super().__init__(follow_css, follow_regex)
        self._parser = LexborHTMLParser
        self.fields = tuple(fields)
        self.list_selector = list_selector

    def _parse(self, content: bytes) -> Any:
        return self._parser(content)

    def _anchor_hrefs(self, tree: Any) -> list[str]:
        return [a.attributes.get("href") for a in tree.css("a[href]")]

    def _attr_hrefs(self, tree: Any, selector: str) -> list[str | None]:
        return [n.attributes.get("href") or n.attributes.get("src") for n in tree.css(selector)]

    def _value(self, node: Any, rule: FieldRule) -> str | None:
        if not rule.all:  # the common case: the first match only (css_first stops there)
            t = node.css_first(rule.css) if rule.css else node
            if t is None:
                return None
            return t.attributes.get(rule.attr) if rule.attr else t.text(deep=True)
        vals = []
        for t in node.css(rule.css) if rule.css else [node]:
            v = t.attributes.get(rule.attr) if rule.attr else t.text(deep=True)
            if v is not None:
                vals.append(clean_text(v))
        return rule.sep.join(vals) if vals else None

    def extract(self, content: bytes, url: str) -> list[Row]:
        tree = self._tree(content)
        root = tree.root if tree.root is not None else tree
        nodes = tree.css(self.list_selector) if self.list_selector else [root]
        out = []
        for node in nodes:
            found: dict[str, Any] = {}  # css → first match: fields sharing a selector query once
            raws: list[str | None] = []
            for rule in self.fields:
                if rule.all or not rule.css:
                    raws.append(self._value(node, rule))
                    continue
                if rule.css in found:
                    t = found[rule.css]
                else:
                    t = found[rule.css] = node.css_first(rule.css)
                if t is None:
                    raws.append(None)
                else:
                    raws.append(t.attributes.get(rule.attr) if rule.attr else t.text(deep=True))
            out.append(_row(self.fields, raws, url))
        return out


class LxmlExtractor(_HtmlExtractor):
    def __init__(
        self,
        fields: Sequence[FieldRule],
        list_selector: str | None,
        list_xpath: str | None,
        follow_css: Sequence[str],
        follow_regex: Sequence[str],
    ) -> None:
        from cssselect import GenericTranslator
        from lxml import etree

        super().__init__(follow_css, follow_regex)
        self._etree = etree
        tr = GenericTranslator()
        self._css = lambda sel, prefix="descendant-or-self::": etree.XPath(
            tr.css_to_xpath(sel, prefix=prefix)
        )
        self.fields = tuple(fields)
        self._field_paths = [
            etree.XPath(f.xpath)
            if f.xpath
            else (self._css(f.css, "descendant::") if f.css else None)
            for f in self.fields
        ]
        if list_xpath:
            self._list = etree.XPath(list_xpath)
        elif list_selector:
            self._list = self._css(list_selector)
        else:
            self._list = None

    def _parse(self, content: bytes) -> Any:
        from lxml import html

        return html.fromstring(content) if content.strip() else html.fromstring(b"<html/>")

    def _anchor_hrefs(self, tree: Any) -> list[str]:
        return [str(h) for h in tree.xpath("//a/@href")]

    def _attr_hrefs(self, tree: Any, selector: str) -> list[str | None]:
        return [n.get("href") or n.get("src") for n in self._css(selector)(tree)]

    @staticmethod
    def _text(item: Any, attr: str | None) -> str | None:
        if isinstance(item, str):
            return str(item)
        if attr:
            return item.get(attr)
        return item.text_content()

    def _value(self, node: Any, rule: FieldRule, path: Any) -> str | None:
        found = path(node) if path is not None else [node]
        if not isinstance(found, list):
            found = [found]
        if not found:
            return None
        if not rule.all:
            found = found[:1]
        vals = [v for v in (self._text(x, rule.attr) for x in found) if v is not None]
        if not vals:
            return None
        if len(vals) == 1:
            return vals[0]
        return rule.sep.join(clean_text(v) for v in vals)

    def extract(self, content: bytes, url: str) -> list[Row]:
        tree = self._tree(content)
        nodes = self._list(tree) if self._list is not None else [tree]
        return [
            _row(
                self.fields,
                (
                    self._value(node, r, p)
                    for r, p in zip(self.fields, self._field_paths, strict=True)
                ),
                url,
            )
            for node in nodes
        ]


def page_fields(fields: Sequence[FieldRule], urls: dict[str, str]) -> Row:
    """The values of ``page`` fields: the page's own URL (``url``, as requested) or where it
    ended after redirects (``final_url``), through the field's regex and type like any
    other value. Not from the content, so they are the same for every entity of a page."""
    return _row(fields, (urls.get(r.page or "") for r in fields), urls.get("final_url", ""))


def _row(fields: Sequence[FieldRule], raws: Iterable[str | None], url: str) -> Row:
    values: dict[str, str | None] = {}
    problems = []
    for rule, raw in zip(fields, raws, strict=True):
        if raw is not None and rule.type == "str" and rule.regex is None:
            values[rule.name] = " ".join(raw.split())  # clean_text, inline: the common case
            continue
        try:
            values[rule.name] = convert(rule, raw, url)
        except Invalid as exc:
            values[rule.name] = None
            problems.append(str(exc))
    return values, "; ".join(problems) or None
