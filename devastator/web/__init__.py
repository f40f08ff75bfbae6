"""The chat page and the JavaScript client, served on the HTTP port.

The page is plain HTML, CSS and ES modules (no build step); it imports the
client from ``/client/devastator-client.js``, the file ``clients/js/index.js``
of this repository, so that the page and the npm package are one code.
"""
from __future__ import annotations

import mimetypes
from pathlib import Path

PAGE_DIR = Path(__file__).parent
CLIENT_DIR = PAGE_DIR.parent.parent / "clients" / "js"
CLIENT_PATH = "/client/devastator-client.js"

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".ts": "text/plain; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}


def page_files() -> dict[str, tuple[str, bytes]]:
    """URL path -> (content type, body) of every file the page needs, read once at start."""
    files = {}
    for path in sorted(PAGE_DIR.iterdir()):
        if path.is_file() and path.suffix in _CONTENT_TYPES and path.suffix != ".py":
            files["/" + path.name] = (_content_type(path), path.read_bytes())
    if "/index.html" in files:
        files["/"] = files["/index.html"]
    for name, url in (("index.js", CLIENT_PATH), ("index.d.ts", "/client/devastator-client.d.ts")):
        source = CLIENT_DIR / name
        if source.is_file():
            files[url] = (_content_type(source), source.read_bytes())
    return files


def _content_type(path: Path) -> str:
    return _CONTENT_TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
