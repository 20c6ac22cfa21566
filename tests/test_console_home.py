"""The home page renders from storage, empty or with data (Streamlit's AppTest)."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from storage import proxies as proxy_store
from storage.db import open_database
from storage.secrets import SecretBox

APP = str(Path(__file__).resolve().parent.parent / "app.py")


@pytest.fixture
def db_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"duckdb:///{tmp_path / 'c.duckdb'}"
    monkeypatch.setenv("FETCHFLEET_DB", url)
    return url


def test_home_renders_empty_database(db_env: str) -> None:
    at = AppTest.from_file(APP, default_timeout=30).run()
    assert not at.exception
    assert at.metric[0].value == "0"


def test_home_shows_runs_and_proxies(db_env: str, tmp_path: Path) -> None:
    from dataclasses import dataclass

    from storage import runs

    @dataclass
    class Spec:
        key: str
        scheme: str | None
        host: str
        port: int
        username: str | None
        password: str | None

    db = open_database(db_env)
    with db.begin() as conn:
        proxy_store.upsert_proxies(
            conn,
            [Spec("socks5://u@1.2.3.4:1080", "socks5", "1.2.3.4", 1080, "u", "hunter2")],
            SecretBox.load(None, tmp_path / "k"),
            "t",
        )
        runs.create_run(conn, "validate", {"judge_url": "x"}, "t")
    db.dispose()
    at = AppTest.from_file(APP, default_timeout=30).run()
    assert not at.exception
    assert at.metric[0].value == "1" and at.metric[3].value == "1"  # 1 run, 1 untested
    proxies_df = at.dataframe[1].value
    assert list(proxies_df["key"]) == ["socks5://u@1.2.3.4:1080"]
    assert "password_enc" not in proxies_df.columns
