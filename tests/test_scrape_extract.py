"""Extraction (both backends), value types, URL normalization and spec parsing."""

from __future__ import annotations

import pytest

from engine.jobs.scrape.spec import SpecError, normalize_url, parse_spec
from fetchers.extract import FieldRule, LexborExtractor, LxmlExtractor, make_extractor
from sim.shops import ShopSpec, catalog_html, shop_products

SPEC = ShopSpec("x-shop", "Malaysia", n_products=45)
CSS = [
    FieldRule("id", attr="data-id"),
    FieldRule("name", css=".name"),
    FieldRule("price", css=".price", type="float"),
    FieldRule("currency", css=".price", attr="data-currency"),
    FieldRule("link", css="a.product-link", attr="href", type="url"),
]


def test_css_and_xpath_backends_agree_with_the_truth() -> None:
    page = catalog_html(SPEC, 2)
    url = "http://shop.test/catalog?page=2"
    fast = make_extractor(CSS, "li.product")
    xpath = [*CSS[:1], FieldRule("name", xpath=".//span[@class='name']/text()"), *CSS[2:]]
    slow = make_extractor(xpath, "li.product")
    assert isinstance(fast, LexborExtractor) and isinstance(slow, LxmlExtractor)
    rows = fast.extract(page, url)
    assert rows == slow.extract(page, url)
    truth = shop_products(SPEC)[20:40]
    assert [r[0]["id"] for r in rows] == [p["id"] for p in truth]
    assert all(r[1] is None for r in rows)
    assert rows[0][0]["price"] == truth[0]["price"]
    assert rows[0][0]["link"] == f"http://shop.test/product/{truth[0]['id']}"
    # links: the spec's CSS, resolved against the page
    ex = make_extractor([], None, follow_css=["a.next", "a.prev"])
    assert ex.links(page, url) == [
        "http://shop.test/catalog?page=3",
        "http://shop.test/catalog?page=1",
    ]
    ex = make_extractor([], None, follow_regex=[r"/product/X"])
    assert len(ex.links(page, url)) == 20


@pytest.mark.parametrize("backend", ["css", "xpath"])
def test_value_types_and_bad_values(backend: str) -> None:
    html = (
        b"<html><body><div id=p><span class=a>RM 1,234.50</span><span class=b>12 pcs</span>"
        b"<span class=c>In stock</span><span class=d>maybe</span><span class=e>SKU: AB-77</span>"
        b"</div></body></html>"
    )

    def rule(name: str, sel: str, **kw: str) -> FieldRule:
        if backend == "css":
            return FieldRule(name, css=sel, **kw)
        return FieldRule(name, xpath=f".//span[@class='{sel[1:]}']", **kw)

    rules = [
        rule("price", ".a", type="float"),
        rule("qty", ".b", type="int"),
        rule("stock", ".c", type="bool"),
        rule("sku", ".e", regex=r"SKU: (\S+)"),
        rule("missing", ".zz"),
    ]
    ((values, problem),) = make_extractor(rules).extract(html, "http://x/")
    assert values == {
        "price": "1234.50",
        "qty": "12",
        "stock": "true",
        "sku": "AB-77",
        "missing": None,
    }
    assert problem is None
    ((values, problem),) = make_extractor([rule("flag", ".d", type="bool")]).extract(
        html, "http://x/"
    )
    assert values == {"flag": None} and problem == "flag: 'maybe' is not a yes/no value"


@pytest.mark.parametrize("backend", ["css", "xpath"])
def test_whitespace_is_one_space_whatever_its_kind(backend: str) -> None:
    """Stripped, and every run of whitespace one space, the no-break space included (the
    PostgreSQL docs' titles: ``1.&nbsp; What Is PostgreSQL?``): a value never depends on
    whether the run also held an ASCII space or a newline."""
    texts = {
        "a": "1.&nbsp; What Is PostgreSQL?",
        "b": "Chapter&nbsp;1.&nbsp;Getting Started",
        "c": "\n  Part&#8195;III \t",
        "d": "x&nbsp;&nbsp;y",
    }
    html = "".join(f"<p class={k}>{v}</p>" for k, v in texts.items()).encode()
    sel = "css" if backend == "css" else "xpath"
    rules = [
        FieldRule(k, **{sel: f".{k}" if backend == "css" else f".//p[@class='{k}']"}) for k in texts
    ]
    rules.append(FieldRule("all", **{sel: "p" if backend == "css" else ".//p"}, all=True))
    rules.append(FieldRule("re", regex=r"Chapter (\d+)", **{sel: rules[1].css or rules[1].xpath}))
    ((values, problem),) = make_extractor(rules).extract(html, "http://x/")
    assert problem is None
    want = {"a": "1. What Is PostgreSQL?", "b": "Chapter 1. Getting Started", "c": "Part III",
            "d": "x y"}  # fmt: skip
    assert values == {**want, "all": " | ".join(want.values()), "re": "1"}


@pytest.mark.parametrize("backend", ["css", "xpath"])
def test_links_that_do_not_parse_never_raise(backend: str) -> None:
    """An unclosed IPv6 host makes urljoin raise: a link is returned as written (the scrape
    records it as a bad link of its page), a url field makes its entity invalid."""
    html = b'<html><body><a class=n href="http://[oops">x</a><a class=n href="/ok">y</a></body>'
    fields = [FieldRule("u", css="a.n", attr="href", type="url")]
    if backend == "xpath":
        fields = [FieldRule("u", xpath=".//a[1]", attr="href", type="url")]
    ex = make_extractor(fields, follow_css=["a.n"], follow_regex=[r"oops|ok"])
    assert ex.links(html, "http://x/") == ["http://[oops", "http://x/ok"] * 2
    assert ex.hrefs(html, "http://x/", ["a.n"]) == ["http://[oops", "http://x/ok"]
    ((values, problem),) = ex.extract(html, "http://x/")
    assert values == {"u": None} and problem == "u: 'http://[oops' is not a URL (Invalid IPv6 URL)"


@pytest.mark.parametrize("backend", ["css", "xpath"])
def test_follow_regex_sees_the_url_that_is_followed(backend: str) -> None:
    """A follow regex is matched against the link as it will be fetched: absolute, without
    its fragment (which never reaches the server). ``\\.html$`` follows ``b.html#sec`` (the
    PostgreSQL docs link 6,420 times so); ``#top`` alone is the page itself, never followed."""
    html = (
        b'<a href="b.html#sec">b</a><a href="c.html">c</a><a href="#top">top</a>'
        b'<a href="d.png#x">d</a><a href="e.html?q=1#y">e</a>'
    )
    fields = [FieldRule("x", xpath="//a")] if backend == "xpath" else []
    ex = make_extractor(fields, follow_regex=[r"\.html$"])
    assert ex.links(html, "http://x/docs/a.html") == [
        "http://x/docs/b.html#sec",
        "http://x/docs/c.html",
    ]


def test_normalize_url() -> None:
    assert normalize_url("HTTP://Shop.Test:80/a?b=1#frag") == "http://shop.test/a?b=1"
    assert normalize_url("https://shop.test:443") == "https://shop.test/"
    assert (
        normalize_url("http://127.0.0.4:8080/catalog?page=2")
        == "http://127.0.0.4:8080/catalog?page=2"
    )
    assert normalize_url("http://[::1]:81/x") == "http://[::1]:81/x"


def test_normalize_url_applies_dot_segments_of_absolute_links() -> None:
    """RFC 3986 5.2.4, as browsers and servers do; ``urljoin`` leaves them in an absolute
    link (``href="http://host/x/../b.html"``), and the page was stored twice."""
    assert normalize_url("http://h/nowhere/../b.html") == "http://h/b.html"
    assert normalize_url("http://h/./a/./b.html") == "http://h/a/b.html"
    assert normalize_url("http://h/a/b/..") == "http://h/a/"
    assert normalize_url("http://h/a/b/.?q=1") == "http://h/a/b/?q=1"
    assert normalize_url("http://h/../../a") == "http://h/a"  # no climbing above the root
    assert normalize_url("http://h/a/%2E%2E/b") == "http://h/b"  # escaped dots are dots
    assert normalize_url("http://h/a//b/") == "http://h/a//b/"  # an empty segment stays
    assert normalize_url("http://h/a..b/.c") == "http://h/a..b/.c"


def test_normalize_url_writes_each_character_one_way() -> None:
    """RFC 3986 6.2.2: escapes in upper case, an escaped unreserved character (letters,
    digits, ``-._~``) as itself, a character a URL may not hold (a space, non-ASCII)
    escaped as UTF-8; reserved characters keep their form (``%2F`` is not ``/``)."""
    for spelling in ("read me.html", "read%20me.html", "r%65ad%20me.html"):
        assert normalize_url(f"http://h/{spelling}") == "http://h/read%20me.html"
    for spelling in ("caf\u00e9.html", "caf%c3%a9.html", "caf%C3%A9.html"):
        assert normalize_url(f"http://h/{spelling}") == "http://h/caf%C3%A9.html"
    assert normalize_url("http://h/tutorial%2dtable.html") == "http://h/tutorial-table.html"
    assert normalize_url("http://h/%7Euser/%7e") == "http://h/~user/~"
    assert normalize_url("http://h/a%2Fb?x=%2f&y=a+b c|d") == "http://h/a%2Fb?x=%2F&y=a+b%20c%7Cd"
    assert normalize_url("http://h/100%") == "http://h/100%"  # not an escape: as written
    assert normalize_url("http://h/q?a=%E2%82%AC&b=\u20ac") == "http://h/q?a=%E2%82%AC&b=%E2%82%AC"


def test_spec_errors_say_where() -> None:
    with pytest.raises(SpecError, match=r"s.toml: not valid TOML: .*line 2, column 10"):
        parse_spec("name = 'x'\nfollow = }\n", "s.toml")
    with pytest.raises(SpecError, match=r"end of document\) \(line 2: is a bracket or a quote"):
        parse_spec("name = 'x'\nfollow = [", "s.toml")
    with pytest.raises(
        SpecError, match=r"extract\[0\].fields.price: .*give css, xpath, attr, json or page"
    ):
        parse_spec(
            "name='x'\ncountry='M'\nstart_urls=['http://a/']\n[[extract]]\n"
            "[extract.fields]\nid={attr='x'}\nprice={type='float'}\n"
        )
    spec = parse_spec(
        "name='x'\nentity_type='p'\n[[sources]]\ncountry='A'\nstart_urls=['http://a/']\n"
        "[[sources]]\ncountry='B'\nstart_urls_file='b.txt'\nmethods=['http','playwright']\n"
        "[follow]\ncss='a.next'\n"
    )
    assert [s.country for s in spec.all_sources()] == ["A", "B"]
    assert spec.follow.css == ["a.next"] and spec.all_sources()[1].methods == ["http", "playwright"]
    with pytest.raises(SpecError, match=r"unknown fetch method|one of"):
        parse_spec("name='x'\ncountry='M'\nstart_urls=['http://a/']\nmethods=['curl']\n")
