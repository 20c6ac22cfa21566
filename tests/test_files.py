"""``engine.files``: bounded reads of user-named files, private uploads and their removal.

read_bounded refuses a special file (FIFO, /dev/zero, a directory) without blocking, a file
over its bound (naming it), and a path outside the allowed roots (also through ``..`` or a
symlink), and never quotes the content; uploads are 0600 in a 0700 directory (tightened when
looser), created exclusively without following a symlink; forget_upload deletes only uploads.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from console import forms
from engine import files
from engine.files import FileRefused, forget_upload, read_bounded


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_reads_a_regular_file_within_its_bound(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_bytes(b"x" * 100)
    assert read_bounded(f, 100) == b"x" * 100
    assert read_bounded(f, 100, [tmp_path]) == b"x" * 100
    with pytest.raises(FileRefused, match=r"100 bytes is larger than 99 bytes"):
        read_bounded(f, 99)
    with pytest.raises(FileRefused, match="no such file"):
        read_bounded(tmp_path / "missing", 10)


@pytest.mark.timeout(20)
def test_special_files_are_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "f.fifo"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes
    for path in (fifo, Path("/dev/zero"), tmp_path):
        with pytest.raises(FileRefused, match="not a regular file"):
            read_bounded(path, 1000)


def test_paths_outside_the_roots_are_refused_without_their_content(tmp_path: Path) -> None:
    root, outside = tmp_path / "specs", tmp_path / "data"
    root.mkdir()
    outside.mkdir()
    secret = outside / "secret.key"
    secret.write_text("TOP-SECRET-VALUE")
    (root / "link.txt").symlink_to(secret)
    for path in (secret, root / ".." / "data" / "secret.key", root / "link.txt"):
        with pytest.raises(FileRefused) as exc:
            read_bounded(path, 1000, [root])
        assert "can only be read from" in str(exc.value) and str(root) in str(exc.value)
        assert "TOP-SECRET" not in str(exc.value)
    with pytest.raises(FileRefused, match="not a text file"):
        files.read_text_bounded(_write(root / "bin", b"\xff\xfe\x00"), 100, [root])


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_excerpt_is_short_and_printable() -> None:
    assert files.excerpt("abc") == "'abc'"
    quoted = files.excerpt("k" * 100 + "\x1b[2J")
    assert len(quoted) < 50 and "\x1b" not in quoted and quoted.endswith("…'")


def test_uploads_are_private_and_created_exclusively(tmp_path: Path) -> None:
    uploads = tmp_path / "uploads"
    uploads.mkdir(mode=0o755)
    os.chmod(uploads, 0o755)  # an existing, looser directory is tightened
    a = forms.save_list("1.2.3.4:80\n", uploads)
    b = forms.save_list("1.2.3.4:80\n", uploads)  # same second, same content: a new name
    assert a != b and a.read_text() == b.read_text() == "1.2.3.4:80\n"
    assert mode(uploads) == 0o700 and mode(a) == 0o600 and mode(b) == 0o600

    fresh = tmp_path / "new" / "uploads"
    assert mode(forms.save_list(b"x\n", fresh, "ids.csv")) == 0o600 and mode(fresh) == 0o700

    target = tmp_path / "victim.txt"
    target.write_text("keep")
    (uploads / "list.txt").symlink_to(target)  # a planted symlink is not followed
    path = files.write_private(uploads, "list.txt", b"new")
    assert path != uploads / "list.txt" and target.read_text() == "keep"
    assert path.read_bytes() == b"new" and mode(path) == 0o600


def test_an_oversized_list_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(files, "MAX_UPLOAD_BYTES", 10)
    with pytest.raises(FileRefused, match="larger than 10 bytes"):
        forms.save_list(b"x" * 11, tmp_path / "uploads")
    assert "larger than 10 bytes" in (forms.check_text(b"x" * 11, "the upload", 10) or "")


def test_forget_upload_deletes_only_uploads(tmp_path: Path) -> None:
    uploads = tmp_path / "uploads"
    path = forms.save_list("a\n", uploads)
    assert forget_upload(path, uploads) and not path.exists()
    assert not forget_upload(path, uploads)  # already gone
    other = _write(tmp_path / "other.txt", b"keep")
    assert not forget_upload(other, uploads) and other.exists()
    assert not forget_upload(uploads / ".." / "other.txt", uploads) and other.exists()
    (uploads / "link").symlink_to(other)
    assert not forget_upload(uploads / "link", uploads) and other.exists()
