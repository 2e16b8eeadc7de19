"""The image installs only the runtime dependencies: every import in services/ must be satisfied by them."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib

from tests.unit.ops.names import COMPOSE, ROOT


def _runtime_closure() -> set[str]:
    """The runtime dependencies of pyproject.toml and everything they pull in (normalised names)."""
    requirements = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    todo = [re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0] for r in requirements]
    seen: set[str] = set()
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:  # a marker-only dependency for other Pythons
            continue
        seen.add(name)
        for req in requires:
            if "extra ==" in req:
                continue
            todo.append(re.split(r"[\s\[<>=!~;(]", req, maxsplit=1)[0])
    return seen


def _imports() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "services").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_third_party_import_is_a_runtime_dependency() -> None:
    runtime = _runtime_closure()
    providers = md.packages_distributions()
    missing = {}
    for top, files in _imports().items():
        if top in sys.stdlib_module_names or top in {"services", "otpgate"}:
            continue
        dists = {d.lower().replace("_", "-") for d in providers.get(top, [])}
        if not dists & runtime:
            missing[top] = sorted(files)[:3]
    assert missing == {}, f"imported by services/ but not installed in the image: {missing}"


def test_the_dockerfile_installs_the_runtime_pins_and_the_code() -> None:
    dockerfile = (COMPOSE / "Dockerfile").read_text()
    assert '["project"]["dependencies"]' in dockerfile and "-c requirements.lock" in dockerfile
    assert "COPY gen ./gen" in dockerfile and "COPY services ./services" in dockerfile
    assert 'ENTRYPOINT ["python", "-m"]' in dockerfile
