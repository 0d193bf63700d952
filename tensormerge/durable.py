"""Durability on POSIX file systems, torch-free (evaluate.py imports it without the engine)."""

from __future__ import annotations

import os


def fsync_dir(path: str) -> None:
    """Make a rename or a new entry in `path` durable (the writer, publish and sweep.json)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
