"""A private per-user directory for runtime files that cannot sit beside the database.

The control socket of a database whose path is too long for AF_UNIX and the rate-limit file
of an in-memory database need a place other processes of the same user can find again, so
a random `mkdtemp` will not do; a predictable name in the shared temp directory lets any
local user plant a symlink or a socket there first. So: `$XDG_RUNTIME_DIR/fetchfleet` (a
per-user tmpfs on systemd machines), else `<tempdir>/fetchfleet-<uid>`, created 0700 and
checked on every use to be a real directory (not a symlink), owned by us, closed to others.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

__all__ = ["private_dir"]


def _runtime_base() -> Path | None:
    value = os.environ.get("XDG_RUNTIME_DIR")
    if not value:
        return None
    try:
        st = os.stat(value)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    return Path(value)


def private_dir() -> Path:
    """The directory (created on first use); raises RuntimeError when someone else's
    directory, a symlink or a directory open to others sits at its name."""
    base = _runtime_base()
    path = (
        base / "fetchfleet" if base else Path(tempfile.gettempdir()) / f"fetchfleet-{os.getuid()}"
    )
    try:
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)  # whatever the umask
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise RuntimeError(
            f"{path} is not a directory of this user (a symlink, a file or another user's): "
            "it may have been planted; remove it, or set XDG_RUNTIME_DIR to a private directory"
        )
    if st.st_mode & 0o077:
        raise RuntimeError(
            f"{path} is open to other users (mode {stat.S_IMODE(st.st_mode):o}): others can "
            f"replace the files in it; run `chmod 700 {path}`"
        )
    return path
