"""Unix socket paths of any length: the kernel takes at most 107 bytes for one.

A data directory deep in a file system can make ``<data_dir>/admin.sock``
longer than that. Through an open descriptor of its directory, the same file
has a short name, ``/proc/self/fd/N/admin.sock``, for both bind and connect.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

MAX_SUN_PATH = 107


@contextlib.contextmanager
def usable_path(path: Path) -> Iterator[str]:
    """A name for ``path`` that fits a socket address, valid inside the ``with``."""
    path = Path(path)
    if len(os.fsencode(str(path))) <= MAX_SUN_PATH:
        yield str(path)
        return
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{directory}/{path.name}"
    finally:
        os.close(directory)
