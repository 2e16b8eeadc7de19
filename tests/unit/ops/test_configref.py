"""tools/configref.py: the configuration reference covers every variable and is checked for drift."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from services.core.config import Setting
from tests.unit.ops.names import PYTHON, ROOT, SERVICES, declared_settings, run

TOOL = ROOT / "tools" / "configref.py"


def test_the_committed_reference_is_up_to_date() -> None:
    result = run([PYTHON, str(TOOL), "--check"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_declared_variable_is_documented_with_its_default() -> None:
    settings = declared_settings()
    doc = (ROOT / "docs" / "configuration.md").read_text()
    for name, setting in settings.items():
        line = next((row for row in doc.splitlines() if row.startswith(f"| `{name}` |")), None)
        assert line is not None, name
        if setting["default"] is None:
            assert "**required**" in line, name
        elif setting["default"] and not setting["secret"]:
            assert f"`{setting['default']}`" in line, name
    for svc in SERVICES:
        assert f"## {svc}" in doc
        assert f"OTPGATE_{svc.upper()}_PORT" in settings
    assert settings["OTPGATE_KEYS"]["secret"] is True
    assert settings["MONGODB_URI"]["default"] is None


def test_drift_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("configref_under_test", TOOL)
    assert spec and spec.loader
    configref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(configref)
    settings = {name: Setting(**{**s, "services": tuple(s["services"])}) for name, s in declared_settings().items()}  # type: ignore[arg-type]
    monkeypatch.setattr(configref, "collect", lambda: settings)
    committed = (ROOT / "docs" / "configuration.md").read_text()
    fresh = tmp_path / "fresh.md"
    fresh.write_text(committed)
    assert configref.main(["--check", "--output", str(fresh)]) == 0
    stale = tmp_path / "configuration.md"
    stale.write_text(committed.replace("OTPGATE_KEYS", "OTPGATE_KEYZ"))
    assert configref.main(["--check", "--output", str(stale)]) == 1
    captured = capsys.readouterr()
    assert "+| `OTPGATE_KEYS`" in captured.out
    assert "out of date" in captured.err
    assert configref.main(["--output", str(stale)]) == 0  # regenerating fixes it
    assert stale.read_text() == committed
