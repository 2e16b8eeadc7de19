"""`otpgate sandbox ...` against a running simulated Telegram and gateway."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest

from services.core.phone import mask_phone
from tests.integration.botgateway.conftest import Gw, new_phone, new_user_id

LAST_ERR: list[str] = []


async def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """The real command, in its own process (as an operator runs it)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli.main",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    LAST_ERR[:] = [err.decode()]
    return int(process.returncode or 0), out.decode()


async def test_play_a_user_from_the_command_line(gw: Gw, capsys: pytest.CaptureFixture[str]) -> None:
    address = gw.stack.addresses["telegramsim"]
    user_id, phone = new_user_id(), new_phone()
    code, out = await run(
        capsys, "--json", "sandbox", "--address", address, "create-user", "--user-id", str(user_id), "--phone", phone
    )
    assert code == 0 and json.loads(out)["user_id"] == str(user_id)
    code, out = await run(capsys, "sandbox", "--address", address, "start", str(user_id), "smscodes_bot")
    assert code == 0 and "[Share my phone number]" in out
    code, out = await run(capsys, "sandbox", "--address", address, "share-contact", str(user_id), "smscodes_bot")
    assert code == 0 and mask_phone(phone) in out
    code, out = await run(capsys, "sandbox", "--address", address, "send-text", str(user_id), "smscodes_bot", "/help")
    assert code == 0 and "/forget" in out
    code, out = await run(capsys, "sandbox", "--address", address, "chat", str(user_id), "smscodes_bot")
    lines = [line for line in out.splitlines() if line.startswith("#")]
    assert lines[0] == "#1 you > /start" and lines[2] == "#3 you > [contact]" and len(lines) == 6
    code, out = await run(capsys, "sandbox", "--address", address, "block", str(user_id), "smscodes_bot")
    assert code == 0 and out.strip() == "blocked smscodes_bot"
    code, _ = await run(capsys, "sandbox", "--address", address, "send-text", str(user_id), "smscodes_bot", "hi")
    assert code == 1
    assert "FAILED_PRECONDITION CHAT_NOT_STARTED" in LAST_ERR[0]
