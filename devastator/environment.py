"""Run ``bin/*`` in the project's own environment, whichever Python started them.

``make setup`` installs the dependencies into ``.venv`` beside ``bin/``; an
operator who types ``bin/devastator ...`` gets the system's ``python3`` from
the shebang, which has none of them. Only ``os`` and ``sys`` are used here,
so that this runs before gevent patches anything.
"""
from __future__ import annotations

import os
import sys


def use_project_environment(script: str) -> None:
    """Re-execute ``script`` with ``.venv/bin/python`` when it exists and is not running it already."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(script)))
    venv = os.path.join(root, ".venv")
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python) or os.path.realpath(sys.prefix) == os.path.realpath(venv):
        return
    os.execv(python, [python, os.path.abspath(script), *sys.argv[1:]])
