"""The console reads only the files it should, and every file read is bounded.

From the Scraping page a spec's ``start_urls_file`` may lie only under specs/ or the uploads
directory: the console's own secret key named there is refused with the allowed places, and
its content never shows; ``/dev/zero`` is refused at once (the old code read it until memory
ran out: that check runs in a subprocess with a short timeout and a memory cap, so it fails
instead of hanging); a spec larger than the bound is refused with the bound named. The CLI
may read any file its user names, with the same bounds and regular-file check; a bad line of
a start-URLs file is quoted only as a short excerpt.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from console.resources import get_console, shutdown_all
from console.testing import ROOT, run_page, use_fresh_database
from storage.bulk import fetch_all
from tests.conftest import cli_here, run_cli, run_python

PAGE = "pages/scraping.py"
SPECS_DIR = ROOT / "specs"
EXAMPLE = SPECS_DIR / "sim_shops.toml"
MEMORY_CAP = 3 << 30  # the old code reads /dev/zero until memory runs out: stop it early


@pytest.fixture
def console_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    try:
        yield use_fresh_database(tmp_path, monkeypatch, workers=0)
    finally:
        shutdown_all()


def with_urls_file(path: str) -> str:
    """The example spec with its first source's start URLs read from ``path``."""
    text = EXAMPLE.read_text()
    first = next(ln for ln in text.splitlines() if ln.startswith("start_urls = "))
    return text.replace(first, f"start_urls_file = {json.dumps(path)}", 1)


def everything_shown(at: Any) -> str:
    """The text of every element the page shows (errors, markdown, captions, widgets)."""
    out = []
    for node in at.main:
        out.append(repr(getattr(node, "value", "")))
        out.append(str(getattr(node, "proto", "")))
    for kind in ("error", "warning", "info", "success", "markdown", "caption", "text_area"):
        out.extend(str(getattr(e, "value", "")) for e in at.get(kind))
    return "\n".join(out)


def start(at: Any) -> Any:
    at.number_input(key="sc_workers").set_value(1)  # DuckDB needs a local worker
    return at.form_submit_button(key="sc_start").click().run()


def errors_of(at: Any) -> str:
    return " | ".join(e.value for e in at.error)


def runs_of(url: str) -> list[tuple[Any, ...]]:
    with get_console(url).db.connect() as conn:
        return [tuple(r) for r in fetch_all(conn, sa.text("SELECT id, kind, status FROM runs"))]


# --- the console ------------------------------------------------------------------------------


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative-to-specs"])
def test_a_start_urls_file_outside_specs_is_refused_and_never_shown(
    console_env: str, tmp_path: Path, relative: bool
) -> None:
    from cryptography.fernet import Fernet

    key_file = tmp_path / "data" / "secret.key"
    key_file.parent.mkdir(parents=True, exist_ok=True)
    secret = Fernet.generate_key().decode()
    key_file.write_text(secret + "\n")
    named = os.path.relpath(key_file, SPECS_DIR) if relative else str(key_file)

    at = run_page(PAGE)
    assert not at.exception, at.exception
    at.text_area(key="sc_text").set_value(with_urls_file(named)).run()
    start(at)
    assert not at.exception, at.exception
    errs = errors_of(at)
    assert "can only be read from" in errs, errs
    assert str(SPECS_DIR) in errs and "uploads" in errs, errs
    assert secret not in everything_shown(at).replace(with_urls_file(named), "")
    assert secret[:12] not in errs
    assert runs_of(console_env) == []


def test_a_start_urls_file_of_dev_zero_is_refused_at_once(tmp_path: Path) -> None:
    """In a subprocess: the old code read /dev/zero until it ran out of memory."""
    script = textwrap.dedent(
        f"""
        import json, sys
        from console.testing import run_page
        from console.resources import shutdown_all
        spec = {with_urls_file("/dev/zero")!r}
        at = run_page({PAGE!r})
        at.text_area(key="sc_text").set_value(spec).run()
        at.number_input(key="sc_workers").set_value(1)
        at.form_submit_button(key="sc_start").click().run()
        print(json.dumps({{"errors": [e.value for e in at.error],
                           "exception": [str(e.value) for e in at.exception]}}))
        shutdown_all()
        """
    )
    env = {
        "FETCHFLEET_DB": f"duckdb:///{tmp_path / 'console.duckdb'}",
        "FETCHFLEET_DATA_DIR": str(tmp_path / "data"),
        "FETCHFLEET_SECRET_KEY_FILE": str(tmp_path / "data" / "secret.key"),
        "FETCHFLEET_WORKERS": "0",
    }
    try:
        out = run_python("-c", script, env=env, timeout=90, memory_cap=MEMORY_CAP)
    except subprocess.TimeoutExpired:
        pytest.fail("reading start_urls_file = /dev/zero did not stop")
    assert out.returncode == 0, out.stderr[-2000:]
    shown = json.loads(out.stdout.strip().splitlines()[-1])
    assert not shown["exception"], shown
    errs = " | ".join(shown["errors"])
    assert "/dev/zero" in errs and "can only be read from" in errs, errs


def test_a_spec_larger_than_the_bound_is_refused(console_env: str) -> None:
    big = EXAMPLE.read_text() + ("# padding\n" * 110_000)  # > 1 MB
    at = run_page(PAGE)
    at.radio(key="sc_source").set_value("Upload a spec").run()
    at.file_uploader(key="sc_upload").set_value(("big.toml", big.encode(), "text/plain")).run()
    assert "larger than 1 MB" in errors_of(at), errors_of(at)
    assert at.text_area(key="sc_text").value == ""

    at.radio(key="sc_source").set_value("A spec under specs/").run()
    at.text_area(key="sc_text").set_value(big).run()
    start(at)
    assert "the spec is larger than 1 MB" in errors_of(at), errors_of(at)
    assert runs_of(console_env) == []


# --- the CLI: any file its user names, with the same bounds ------------------------------------


def capped_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a process with a memory cap and a timeout: a read of /dev/zero (or a FIFO
    nobody writes) fails the test instead of eating the machine's memory or hanging it."""
    try:
        return run_cli(*args, timeout=60, memory_cap=MEMORY_CAP)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`engine.run {' '.join(args)}` did not stop")


def test_cli_refuses_special_files(tmp_path: Path) -> None:
    db = f"duckdb:///{tmp_path / 'c.duckdb'}"
    spec = tmp_path / "s.toml"
    fifo = tmp_path / "urls.fifo"
    os.mkfifo(fifo)
    for target, expected in [
        ("/dev/zero", "not a regular file"),
        (str(tmp_path), "not a regular file (a directory)"),
        (str(fifo), "not a regular file"),
    ]:
        spec.write_text(with_urls_file(target))
        out = capped_cli("scrape", "--spec", str(spec), "--db", db)
        assert out.returncode == 2 and expected in out.stderr, out.stderr[-2000:]


def test_cli_refuses_oversized_files(tmp_path: Path) -> None:
    """In this process: were the bound gone, a read of these few MB would still end."""
    db = f"duckdb:///{tmp_path / 'c.duckdb'}"
    spec = tmp_path / "s.toml"
    urls = tmp_path / "urls.txt"
    with urls.open("wb") as fh:
        fh.truncate(50_000_000)  # sparse: no disk used
    spec.write_text(with_urls_file(str(urls)))
    out = cli_here("scrape", "--spec", str(spec), "--db", db)
    assert out.returncode == 2 and "larger than 20 MB" in out.stderr, out.stderr[-2000:]

    big_spec = tmp_path / "big.toml"
    with big_spec.open("wb") as fh:
        fh.truncate(5_000_000)
    out = cli_here("scrape", "--spec", str(big_spec), "--db", db)
    assert out.returncode == 2 and "larger than 1 MB" in out.stderr, out.stderr[-2000:]


def test_a_bad_line_of_a_start_urls_file_is_quoted_only_in_short(tmp_path: Path) -> None:
    secret = "gAAAAAB" + "x" * 200
    urls = tmp_path / "urls.txt"
    urls.write_text(f"# comment\nhttp://ok.example/\n{secret}\n")
    spec = tmp_path / "s.toml"
    spec.write_text(with_urls_file(str(urls)))
    out = cli_here("scrape", "--spec", str(spec), "--db", f"duckdb:///{tmp_path / 'c.duckdb'}")
    assert out.returncode == 2 and "line 3" in out.stderr and "not an http(s) URL" in out.stderr
    assert secret[:40] in out.stderr and secret[:41] not in out.stderr, out.stderr[-2000:]
