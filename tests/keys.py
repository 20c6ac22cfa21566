"""The secret-key file the suite's runs encrypt proxy passwords with: one per test session,
in a private temp dir, never a fixed shared path. The dir is chosen once and passed on in
the environment, so CLI subprocesses and spawned workers (which import test modules again)
use the same file; the process that made it removes it at exit."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

_ENV = "FETCHFLEET_TEST_KEY_DIR"

if _ENV not in os.environ:
    _dir = tempfile.mkdtemp(prefix="fetchfleet-test-key-")
    os.environ[_ENV] = _dir
    atexit.register(shutil.rmtree, _dir, True)

KEY_FILE = Path(os.environ[_ENV]) / "secret.key"
