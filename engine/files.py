"""Reading files a user named, bounded: the one place every such read goes through.

A spec, a start-URLs file, an uploaded or pasted list: ``read_bounded`` refuses a path outside
``allowed_roots`` (the console: specs/ and the uploads directory; the CLI passes None, its
user owns the terminal), anything that is not a regular file (``/dev/zero``, a FIFO, a
directory: checked with ``stat`` before opening, and again on the open descriptor), and a
file larger than its bound; it reads at most ``max_bytes`` + 1 bytes. Its ``FileRefused``
message names the path, the reason and the bound or the allowed places, never the content.
``excerpt`` is the short, sanitized quote of a line that an error may show instead.

Uploads are written ``0600`` in a ``0700`` directory (``write_private``) and removed with
``forget_upload`` once their run is done.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "MAX_SPEC_BYTES",
    "MAX_START_URLS_BYTES",
    "MAX_UPLOAD_BYTES",
    "FileRefused",
    "excerpt",
    "forget_upload",
    "read_bounded",
    "read_text_bounded",
    "within",
    "write_private",
]

MAX_SPEC_BYTES = 1_000_000  # a scrape spec (TOML)
MAX_START_URLS_BYTES = 20_000_000  # a start_urls_file (one URL a line)
MAX_UPLOAD_BYTES = 200_000_000  # a pasted or uploaded list (Streamlit's own upload limit)


class FileRefused(ValueError):
    """A file that is not read: outside the allowed places, not a regular file, too large,
    missing or not text. The message names the path and why, never the file's content."""


def size_text(n: int) -> str:
    """A bound for people: 1 MB, 20 MB, 512 bytes."""
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000:,} MB"
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000:,} KB"
    return f"{n:,} bytes"


def within(path: str | Path, roots: Iterable[str | Path]) -> bool:
    """Whether ``path`` (symlinks and ``..`` resolved) lies under one of ``roots``."""
    real = Path(path).resolve()
    return any(real.is_relative_to(Path(r).resolve()) for r in roots)


def read_bounded(
    path: str | Path,
    max_bytes: int,
    allowed_roots: Iterable[str | Path] | None = None,
    what: str = "file",
) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``, under ``allowed_roots`` when
    given (None: anywhere, for the CLI). Raises ``FileRefused`` saying why, without reading
    a special file at all and never more than ``max_bytes`` + 1 bytes."""
    p = Path(path)
    label = f"{what} {p}"
    if allowed_roots is not None:
        roots = [str(r) for r in allowed_roots]
        if not within(p, roots):
            raise FileRefused(
                f"{label}: files can only be read from {' or '.join(roots)} "
                "(put the file there, or upload it)"
            )
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise FileRefused(f"{p}: no such {what}") from None
    except OSError as exc:
        raise FileRefused(f"{label}: cannot be read ({exc.strerror})") from None
    _check_stat(st, label, max_bytes)
    try:  # O_NONBLOCK: a FIFO swapped in since the stat does not block the open
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise FileRefused(f"{label}: cannot be read ({exc.strerror})") from None
    try:
        _check_stat(os.fstat(fd), label, max_bytes)
        chunks, left = [], max_bytes + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_bytes:  # it grew since the stat
        raise FileRefused(f"{label}: larger than {size_text(max_bytes)}, the most read")
    return data


def read_text_bounded(
    path: str | Path,
    max_bytes: int,
    allowed_roots: Iterable[str | Path] | None = None,
    what: str = "file",
) -> str:
    """``read_bounded`` decoded as UTF-8; a file that is not UTF-8 text is refused."""
    data = read_bounded(path, max_bytes, allowed_roots, what)
    if b"\x00" in data[:8192]:
        raise FileRefused(f"{what} {path}: not a text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise FileRefused(f"{what} {path}: not a text file (UTF-8 expected)") from None


def _check_stat(st: os.stat_result, label: str, max_bytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a device, pipe or socket"
        raise FileRefused(f"{label}: not a regular file ({kind})")
    if st.st_size > max_bytes:
        raise FileRefused(
            f"{label}: {size_text(st.st_size)} is larger than {size_text(max_bytes)}, the most read"
        )


def excerpt(text: str, limit: int = 40) -> str:
    """A short, printable quote of a line for an error message (control characters and the
    rest past ``limit`` dropped), so a message never carries a file's content."""
    clean = "".join(ch if ch.isprintable() else "?" for ch in text[: limit + 1])
    return repr(clean[:limit] + ("…" if len(clean) > limit else ""))


def private_dir(directory: Path) -> Path:
    """``directory`` created if needed and made ``0700`` (also when it was looser)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if stat.S_IMODE(directory.stat().st_mode) != 0o700:
        directory.chmod(0o700)
    return directory


def write_private(directory: Path, name: str, data: bytes) -> Path:
    """Write ``data`` as a new ``0600`` file in the ``0700`` ``directory``: created with
    O_CREAT|O_EXCL|O_NOFOLLOW (no race, no symlink followed); a taken name gets a suffix."""
    private_dir(directory)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    stem, dot, ext = name.rpartition(".")
    for n in range(1000):
        candidate = name if n == 0 else (f"{stem}-{n}.{ext}" if dot else f"{name}-{n}")
        path = directory / candidate
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            continue
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return path
    raise FileRefused(f"{directory}: no free name for {name}")


def forget_upload(path: str | Path, uploads_dir: str | Path) -> bool:
    """Delete an upload once its run is done; only a file (not a symlink) that lies under
    ``uploads_dir``, so a run's parameters cannot make it delete anything else. True when
    a file was removed."""
    p = Path(path)
    root = Path(uploads_dir).resolve()
    if not p.parent.resolve().is_relative_to(root):
        return False
    try:
        if not stat.S_ISREG(os.lstat(p).st_mode):
            return False
        p.unlink()
    except FileNotFoundError:
        return False
    return True
