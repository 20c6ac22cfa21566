"""FetchSettings: every knob of the fetchers, one typed object.

Like the engine's `Settings` it reads `FETCHFLEET_<NAME>` variables (and `.env`), but it
lives here because `fetchers/` must not import `engine/`. It is passed in explicitly
(`Fetcher(settings=...)`); only the module-level `fetch()`/`afetch()` helpers build a
default one from the environment. Secrets are never fields: the tor control password and
API tokens are given as the *name* of an environment variable, read when needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["FetchSettings"]


class FetchSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FETCHFLEET_", env_file=".env", extra="ignore")

    # -- the cascade
    policy_file: Path | None = Field(
        None, description="TOML with a per-country method order; overrides the built-in one."
    )
    fetch_timeout_s: float = Field(20.0, gt=0, description="Timeout of one attempt.")
    retries: int = Field(2, ge=0, le=20, description="Retries per method on transient errors.")
    backoff_s: float = Field(0.5, ge=0, description="First retry delay; doubles, with jitter.")
    backoff_max_s: float = Field(8.0, ge=0, description="Longest delay between retries.")
    max_retry_after_s: float = Field(
        30.0, ge=0, description="Honour a 429's Retry-After up to this; longer: next method."
    )
    explore_rate: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Share of requests to a domain that learned a costlier method which "
        "try the cheaper methods first again (so a domain can move back down).",
    )
    handoff_cookies: bool = Field(
        True,
        description="Give cookies a browser earned on a domain (with its User-Agent) to the "
        "http method for the same domain.",
    )
    min_length: int = Field(1, ge=0, description="Shortest acceptable body in bytes.")
    max_page_bytes: int = Field(
        10 * 1024 * 1024,
        ge=1024,
        description="Largest page body any method keeps (http, tor, api pages and their sum, "
        "a browser's HTML); a bigger one is stopped and the fetch fails as too_large. A "
        "download's own max_bytes replaces it.",
    )
    domain_concurrency: int = Field(8, ge=1, description="Requests in flight per domain.")
    domain_delay_s: float = Field(0.0, ge=0, description="Gap between request starts per domain.")

    # -- cache
    cache: Literal["off", "ttl", "lru"] = Field("off", description="Response cache kind.")
    cache_size: int = Field(1024, ge=1, description="Most responses kept by the cache.")
    cache_ttl_s: float = Field(300.0, gt=0, description="Age limit of a cached response (ttl).")

    # -- http (curl_cffi)
    impersonate: str = Field(
        "chrome", description="curl_cffi browser profile: TLS, HTTP/2 and headers of one browser."
    )

    http_max_clients: int = Field(
        64, ge=1, le=4096, description="curl handles of the http method (its concurrency)."
    )

    # -- browsers
    chromium_path: Path = Field(Path("/usr/bin/chromium"), description="System Chromium.")
    chromedriver_path: Path = Field(Path("/usr/bin/chromedriver"), description="ChromeDriver.")
    browser_pages: int = Field(2, ge=1, le=32, description="Pages open at once per browser.")
    browser_relaunch_every: int = Field(
        100, ge=1, description="Relaunch a browser after this many pages (bounds its memory)."
    )
    challenge_wait_s: float = Field(
        12.0, ge=0, description="How long a browser waits for a JS challenge to clear."
    )
    network_idle_ms: int = Field(
        500, ge=0, description="Quiet time that counts as network idle when no selector is given."
    )

    # -- tor
    tor_socks: str = Field("127.0.0.1:9050", description="Tor's SOCKS port (host:port).")
    tor_control: str = Field("127.0.0.1:9051", description="Tor's control port (host:port).")
    tor_password_env: str | None = Field(
        None, description="NAME of the variable holding the control password (else cookie auth)."
    )
    tor_launch: bool = Field(
        False, description="Start our own tor through stem when none answers on tor_control."
    )
    tor_cmd: str = Field("tor", description="The tor binary used with tor_launch.")
    tor_offline: bool = Field(
        False,
        description="Launch tor with DisableNetwork 1 (tests, demo): control port only, "
        "it never contacts the public network.",
    )
    tor_data_dir: Path | None = Field(None, description="DataDirectory of a launched tor.")
