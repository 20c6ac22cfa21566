"""Logging setup for the CLI and worker processes: stderr, one line per record."""

from __future__ import annotations

import logging


def setup_logging(level: str = "WARNING") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
    )
