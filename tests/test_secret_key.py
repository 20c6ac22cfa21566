"""The secret key file: created once, atomically, loudly.

Two first uses at once (the console and a CLI run, two pool workers) must end with one key
that both use: never a FileExistsError, never an empty key read half-written. A machine that
makes a new key says so, with the absolute path, because proxies stored under another key
cannot be decrypted with it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import stat
import threading
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from storage.secrets import SecretBox

RACERS = 6


def test_first_uses_at_once_share_one_key(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "data" / "secret.key"
    barrier = threading.Barrier(RACERS, timeout=30)
    real_generate = Fernet.generate_key

    def generate_together() -> bytes:  # every racer past the "no key yet" check at once
        barrier.wait()
        return real_generate()

    monkeypatch.setattr(Fernet, "generate_key", staticmethod(generate_together))
    boxes: list[SecretBox] = []
    failures: list[BaseException] = []

    def racer() -> None:
        try:
            boxes.append(SecretBox.load(None, path))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=racer) for _ in range(RACERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures, failures
    assert len(boxes) == RACERS
    token = boxes[0].encrypt("pw")
    assert all(b.decrypt(token) == "pw" for b in boxes)  # one key for all
    assert Fernet(path.read_bytes().strip()).decrypt(token.encode()) == b"pw"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["secret.key"]  # no temp left


def _load_in_child(path: str, barrier, queue) -> None:
    real_generate = Fernet.generate_key

    def generate_together() -> bytes:
        barrier.wait()
        return real_generate()

    Fernet.generate_key = staticmethod(generate_together)  # type: ignore[method-assign]
    try:
        box = SecretBox.load(None, Path(path))
        queue.put(("ok", box.encrypt("pw")))
    except BaseException as exc:
        queue.put(("error", repr(exc)))


def test_first_uses_in_several_processes_share_one_key(tmp_path: Path) -> None:
    # spawn, as the pool starts its workers: a fork of this many-threaded test process can
    # inherit a lock some thread held, and the children then hang on their way out
    ctx = multiprocessing.get_context("spawn")
    path = tmp_path / "secret.key"
    barrier = ctx.Barrier(4, timeout=120)  # spawned children import first
    queue = ctx.Queue()
    procs = [ctx.Process(target=_load_in_child, args=(str(path), barrier, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(30)
    assert [kind for kind, _ in got] == ["ok"] * 4, got
    box = SecretBox.load(None, path)
    assert {box.decrypt(token) for _, token in got} == {"pw"}


def test_a_new_key_is_announced_with_its_absolute_path(
    tmp_path: Path, monkeypatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="storage.secrets"):
        SecretBox.load(None, Path("data/secret.key"))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert str(tmp_path / "data" / "secret.key") in text
    assert "FETCHFLEET_SECRET_KEY" in text and "cannot be decrypted" in text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="storage.secrets"):
        SecretBox.load(None, Path("data/secret.key"))  # the existing key: nothing to say
        SecretBox.load(Fernet.generate_key().decode(), Path("elsewhere.key"))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not os.path.exists("elsewhere.key")
