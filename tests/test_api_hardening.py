"""The api method keeps its token at home: pagination `next` links are followed only over
http(s) and only within the API's own origin (or hosts the spec lists in `next_hosts`), and a
spec cannot hold a literal credential header (the `env:` form keeps only a variable's name).

Two tiny HTTP servers on 127.0.0.1: the API, whose `next` links the test chooses, and an
"elsewhere" that records every Authorization header it receives.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from engine.jobs.scrape.spec import SpecError, parse_spec
from fetchers import Fetcher, FetchSettings
from fetchers.errors import ErrorType
from fetchers.methods.api import ApiSpec

pytestmark = pytest.mark.timeout(60)

TOKEN = "api-token-Zx81"


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None, str | None]] = []  # path, auth, x-api-key
        self.next: Any = None
        self.redirect: str | None = None


def serve(rec: Recorder) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            rec.seen.append(
                (self.path, self.headers.get("Authorization"), self.headers.get("X-Api-Key"))
            )
            if rec.redirect and self.path.startswith("/api"):
                self.send_response(302)
                self.send_header("Location", rec.redirect)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            nxt = rec.next if self.path == "/api?page=1" else None
            body = json.dumps({"items": [self.path], "next": nxt}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


@pytest.fixture
def api() -> Iterator[tuple[Recorder, str, Recorder, str]]:
    home, away = Recorder(), Recorder()
    s1, s2 = serve(home), serve(away)
    try:
        yield home, f"http://127.0.0.1:{s1.server_port}", away, f"127.0.0.1:{s2.server_port}"
    finally:
        for s in (s1, s2):
            s.shutdown()
            s.server_close()


def fetch_api(spec: ApiSpec, url: str) -> Any:
    async def go() -> Any:
        settings = FetchSettings(retries=0, backoff_s=0.01, cache="off", explore_rate=0.0)
        async with Fetcher(settings) as f:
            return await f.fetch(url, method="api", api=spec)

    return asyncio.run(go())


def spec_for(base: str, **kw: Any) -> ApiSpec:
    return ApiSpec(
        url_template=base + "/api?page=1",
        auth_env="FF_TEST_API_TOKEN",
        pagination="next",
        max_pages=5,
        **kw,
    )


@pytest.fixture(autouse=True)
def token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FF_TEST_API_TOKEN", TOKEN)


def test_next_on_the_same_origin_is_followed(api) -> None:
    home, base, _, _ = api
    home.next = "/api?page=2"
    r = fetch_api(spec_for(base), base + "/")
    assert r.success, r.error
    assert json.loads(r.content)["items"] == ["/api?page=1", "/api?page=2"]
    assert [auth for _, auth, _ in home.seen] == [f"Bearer {TOKEN}"] * 2


@pytest.mark.parametrize(
    "hostile",
    [
        "http://{away}/steal",
        "//{away}/steal",
        "https://{away}/steal",
        "file:///etc/hostname",
        "ftp://{away}/steal",
        "gopher://{away}/steal",
    ],
)
def test_next_elsewhere_is_refused_and_the_token_stays(api, hostile: str) -> None:
    home, base, away, away_netloc = api
    home.next = hostile.format(away=away_netloc)
    r = fetch_api(spec_for(base), base + "/")
    assert not r.success and r.attempts[-1].error_type == ErrorType.INVALID
    assert "next_hosts" in (r.error or "") or "http" in (r.error or "")
    assert away.seen == []
    assert TOKEN not in (r.error or "")
    assert Path("/etc/hostname").read_text().strip() not in r.content.decode("latin-1")


def test_hosts_the_spec_allows_are_followed(api) -> None:
    home, base, away, away_netloc = api
    home.next = f"http://{away_netloc}/more"
    r = fetch_api(spec_for(base, next_hosts=(away_netloc,)), base + "/")
    assert r.success, r.error
    assert json.loads(r.content)["items"] == ["/api?page=1", "/more"]
    assert away.seen == [("/more", f"Bearer {TOKEN}", None)]


def test_a_redirect_elsewhere_does_not_carry_the_token(api) -> None:
    home, base, away, away_netloc = api
    home.redirect = f"http://{away_netloc}/moved"
    fetch_api(spec_for(base), base + "/")
    assert all(auth is None for _, auth, _ in away.seen), away.seen


def test_a_literal_credential_header_is_refused_with_the_env_form(
    monkeypatch: pytest.MonkeyPatch, api
) -> None:
    toml = "name='x'\ncountry='M'\nstart_urls=['http://a/']\n[api]\nheaders = {{ {h} }}\n"
    for literal in ('"X-Api-Key" = "k-123"', '"Authorization" = "Bearer k-123"'):
        with pytest.raises(SpecError, match="env:") as info:
            parse_spec(toml.format(h=literal))
        assert "k-123" not in str(info.value)
    with pytest.raises(ValueError, match="env:"):
        ApiSpec(headers={"X-Session-Token": "abc"})
    spec = parse_spec(toml.format(h='"X-Api-Key" = "env:FF_TEST_API_KEY", "X-Plain" = "1"'))
    assert spec.api is not None

    home, base, _, _ = api
    monkeypatch.setenv("FF_TEST_API_KEY", "key-Qw55")
    api_spec = ApiSpec(
        url_template=base + "/api?page=1", headers={"X-Api-Key": "env:FF_TEST_API_KEY"}
    )
    r = fetch_api(api_spec, base + "/")
    assert r.success, r.error
    assert home.seen[-1][2] == "key-Qw55"
    assert "key-Qw55" not in repr(api_spec)
