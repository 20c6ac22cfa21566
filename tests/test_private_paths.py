"""Runtime files outside the data directory live in a private per-user directory.

The control socket of a database whose path is too long for AF_UNIX and the rate-limit file
of an in-memory database used to be predictable names in the shared temp directory
(`/tmp/fetchfleet-<digest>.ctl`, `/tmp/fetchfleet-ratelimit-<pid>.bin`): another local user
could plant a symlink there (the limiter would truncate and write the file it points to) or
a socket of their own (the CLI would send it commands and believe its answers).
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path

import pytest

from engine.ratelimit.base import Rate
from engine.ratelimit.shared import SIZE, SharedLimiter, shared_path_for
from engine.runtime.control import ControlServer, ask, control_path


@pytest.fixture
def shared_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in for /tmp: the shared temp dir, with no XDG_RUNTIME_DIR."""
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    return shared


def _assert_private(directory: Path) -> None:
    st = os.lstat(directory)
    assert stat.S_ISDIR(st.st_mode) and not stat.S_ISLNK(st.st_mode)
    assert st.st_uid == os.getuid()
    assert stat.S_IMODE(st.st_mode) == 0o700


def test_ratelimit_file_ignores_a_planted_symlink(shared_tmp: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    pid = 424242
    (shared_tmp / f"fetchfleet-ratelimit-{pid}.bin").symlink_to(victim)

    path = shared_path_for(None, coordinator_pid=pid)
    limiter = SharedLimiter(path)
    try:
        assert limiter.acquire_now("k", Rate.parse("10/s")) == 0.0
    finally:
        limiter.close()
    assert victim.read_bytes() == b"precious"
    _assert_private(path.parent)
    assert path.stat().st_size == SIZE


def test_ratelimit_file_is_never_opened_through_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    planted = tmp_path / "fetchfleet.duckdb.ratelimit"
    planted.symlink_to(victim)
    with pytest.raises(OSError):
        SharedLimiter(planted)
    assert victim.read_bytes() == b"precious"


def test_control_socket_of_a_long_path_is_private(shared_tmp: Path, tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    database = str(deep / "fetchfleet.duckdb")
    digest = hashlib.sha1(str(Path(database).resolve()).encode()).hexdigest()[:16]
    old = shared_tmp / f"fetchfleet-{digest}.ctl"
    rogue = tmp_path / "rogue.sock"
    old.symlink_to(rogue)  # where another user's socket would answer

    path = control_path(database)
    assert path != old and not str(path).startswith(str(old))
    assert len(str(path)) <= 100
    _assert_private(path.parent)

    class Coordinator:
        db = None

        def command(self, run_id: int, action: str, source: str) -> str:
            return f"{action}:{run_id}"

    server = ControlServer(path, Coordinator())
    server.start()
    try:
        got = ask(path, {"op": "command", "run_id": 7, "action": "stop"})
    finally:
        server.stop()
    assert got == {"run_id": 7, "status": "stop:7"}
    assert old.is_symlink() and not rogue.exists()


def test_a_planted_private_dir_is_refused(shared_tmp: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "attacker"
    elsewhere.mkdir()
    (shared_tmp / f"fetchfleet-{os.getuid()}").symlink_to(elsewhere)
    from engine.private_dir import private_dir

    with pytest.raises(RuntimeError, match="not a directory of this user"):
        private_dir()


def test_a_loose_private_dir_is_refused(shared_tmp: Path) -> None:
    loose = shared_tmp / f"fetchfleet-{os.getuid()}"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    from engine.private_dir import private_dir

    with pytest.raises(RuntimeError, match="others can"):
        private_dir()


def test_xdg_runtime_dir_is_preferred(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    from engine.private_dir import private_dir

    assert private_dir() == runtime / "fetchfleet"
    _assert_private(runtime / "fetchfleet")
