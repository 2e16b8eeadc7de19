"""The console's files: served from memory with a strict CSP, hashed assets cached for good."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from services.edge.console import CSP, ConsoleFiles


def _built(tmp_path: Path) -> Path:
    (tmp_path / "assets").mkdir()
    (tmp_path / "index.html").write_text("<!doctype html><script type=module src=assets/console.0123456789ab.js>")
    (tmp_path / "assets" / "console.0123456789ab.js").write_text("export {};")
    (tmp_path / "assets" / "icon.svg").write_text("<svg/>")
    return tmp_path


def test_pages_and_assets_carry_the_policy_and_the_right_caching(tmp_path: Path) -> None:
    files = ConsoleFiles(_built(tmp_path))
    page = files.respond("GET", "/console/")
    assert isinstance(page, web.Response) and page.status == 200
    assert page.headers["Content-Security-Policy"] == CSP
    assert "'unsafe-inline'" not in CSP and "default-src 'none'" in CSP and "frame-ancestors 'none'" in CSP
    assert page.headers["Cache-Control"] == "no-store" and page.content_type == "text/html"
    script = files.respond("GET", "/console/assets/console.0123456789ab.js")
    assert isinstance(script, web.Response) and script.body == b"export {};"
    assert script.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert script.content_type in ("text/javascript", "application/javascript")
    icon = files.respond("GET", "/console/assets/icon.svg")
    assert icon is not None and icon.headers["Cache-Control"] == "no-cache"


def test_everything_else_is_refused_or_not_ours(tmp_path: Path) -> None:
    files = ConsoleFiles(_built(tmp_path))
    redirect = files.respond("GET", "/console")
    assert redirect is not None and (redirect.status, redirect.headers["Location"]) == (308, "/console/")
    for path in ("/console/assets/../index.html", "/console/assets/missing.js", "/console/x"):
        answer = files.respond("GET", path)
        assert answer is not None and answer.status == 404, path
    posted = files.respond("POST", "/console/")
    assert posted is not None and posted.status == 405
    assert files.respond("GET", "/consoles") is None and files.respond("GET", "/v1/messages") is None


def test_an_unbuilt_console_says_how_to_build_it(tmp_path: Path) -> None:
    files = ConsoleFiles(tmp_path / "nothing")
    answer = files.respond("GET", "/console/")
    assert isinstance(answer, web.Response) and answer.status == 503
    assert answer.text is not None and "make install" in answer.text
