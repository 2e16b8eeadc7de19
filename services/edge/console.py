"""The web console's files, served by the edge at /console from a local build (console/dist).

The build (`make install`: console/build.mjs) writes index.html and content-hashed assets. They
are read once at start-up: a request never touches the disk, and nothing is fetched from
elsewhere at run time. Every answer carries a strict Content-Security-Policy (scripts, styles
and API calls from this origin only; no inline code, no frames, no forms posted elsewhere), so a
key typed into the console can only ever travel to this edge.
"""

from __future__ import annotations

import mimetypes
import re
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from services.core.logging import get_logger

log = get_logger(__name__)

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DIR = ROOT / "console" / "dist"
PREFIX = "/console"
CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}
_ASSET = re.compile(r"^[A-Za-z0-9_.-]+$")
_MAX_FILES = 200


@dataclass(frozen=True)
class _File:
    body: bytes
    content_type: str
    cache: str


class ConsoleFiles:
    """The built console in memory; `respond` answers a GET under /console (or None: not ours)."""

    def __init__(self, directory: Path = DEFAULT_DIR) -> None:
        self.directory = directory
        self._files: dict[str, _File] = {}
        index = directory / "index.html"
        if not index.is_file():
            log.warning("console_not_built", directory=str(directory))
            return
        self._files["/"] = _File(index.read_bytes(), "text/html; charset=utf-8", "no-store")
        assets = directory / "assets"
        for path in sorted(assets.iterdir())[:_MAX_FILES] if assets.is_dir() else []:
            if path.is_file() and _ASSET.match(path.name):
                kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
                if kind.startswith("text/") or kind == "application/javascript" or kind.endswith("+xml"):
                    kind += "; charset=utf-8"
                # Hashed names never change content; the icon's name is fixed, so it revalidates.
                hashed = re.search(r"\.[0-9a-f]{12}\.", path.name) is not None
                cache = "public, max-age=31536000, immutable" if hashed else "no-cache"
                self._files[f"/assets/{path.name}"] = _File(path.read_bytes(), kind, cache)

    @property
    def built(self) -> bool:
        return "/" in self._files

    def respond(self, method: str, path: str) -> web.StreamResponse | None:
        if path != PREFIX and not path.startswith(PREFIX + "/"):
            return None
        if method not in ("GET", "HEAD"):
            return _text(405, "method not allowed", {"Allow": "GET, HEAD"})
        if path == PREFIX:
            return web.Response(status=308, headers={**SECURITY_HEADERS, "Location": PREFIX + "/"})
        rest = path[len(PREFIX) :]
        found = self._files.get(rest)
        if found is None and rest == "/":
            return _text(503, "the console is not built: run `make install` (it builds console/dist)", {})
        if found is None:
            return _text(404, "not found", {})
        response = web.Response(body=found.body, headers={**SECURITY_HEADERS, "Cache-Control": found.cache})
        response.content_type = found.content_type.split(";")[0]
        if "charset" in found.content_type:
            response.charset = "utf-8"
        return response


def _text(status: int, text: str, headers: dict[str, str]) -> web.Response:
    return web.Response(status=status, text=text + "\n", headers={**SECURITY_HEADERS, **headers})
