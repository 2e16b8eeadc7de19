"""The docs answer from the repository alone: every link stays inside it and leads somewhere."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.unit.ops.names import ROOT

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
# Assembled, so this file does not name what it looks for.
OUTSIDE = ("../" + "shared", "DESIGN" + ".md")


def _markdown() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return files + sorted((ROOT / "services").glob("*/README.md"))


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    headings = [line.lstrip("#").strip() for line in FENCE.sub("", text).splitlines() if line.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_every_link_in_the_docs_stays_in_the_repository_and_resolves() -> None:
    problems: list[str] = []
    for doc in _markdown():
        for target in LINK.findall(FENCE.sub("", doc.read_text())):
            where = f"{doc.relative_to(ROOT)} -> {target}"
            if re.match(r"^[a-z]+:", target):
                problems.append(f"{where}: links outside the repository")
                continue
            path, _, anchor = target.partition("#")
            resolved = (doc.parent / path).resolve() if path else doc
            if not resolved.is_relative_to(ROOT) or not resolved.exists():
                problems.append(f"{where}: no such file in the repository")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved.read_text()):
                problems.append(f"{where}: no such heading")
    assert problems == []


def test_no_tracked_file_points_at_the_design_notes_outside_the_repository() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    named = []
    for name in tracked.splitlines():
        path = ROOT / name
        if path.suffix not in {".md", ".py", ".proto", ".yml", ".yaml", ".toml", ".json", ".go", ".sh"}:
            continue
        text = path.read_text(errors="replace")
        named += [f"{name}: {needle}" for needle in OUTSIDE if needle in text]
    assert named == []
