"""`otpgate policies ...` / `otpgate bots ...` / `otpgate status` against a running edge, delivery and botgateway."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from services.cli.main import main
from services.core.crypto import Keyring
from services.core.mongo import Document
from services.edge.app import EdgeApp
from tests.support.stack import running_stack


async def _cli(*argv: str) -> tuple[int, str, str]:
    """The CLI is synchronous gRPC: run it in a thread so the in-process servers keep serving."""
    out, err = io.StringIO(), io.StringIO()

    def run() -> int:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            return main(list(argv))

    code = await asyncio.to_thread(run)
    return code, out.getvalue(), err.getvalue()


async def test_policies_bots_and_status_through_the_admin_api(
    mongo_client: AsyncMongoClient[Document],
    mongo_uri: str,
    keyring: Keyring,
    monkeypatch: pytest.MonkeyPatch,
    captured_logs: Any,
) -> None:
    services = ["directory", "botgateway", "delivery", "edge"]
    async with running_stack(mongo_client, keyring, services) as stack:
        edge = stack.app("edge")
        assert isinstance(edge, EdgeApp) and edge.admin is not None
        acme = await edge.admin.create_client("Acme Shop")
        _, admin_key = await edge.admin.create_key(acme.id, ["admin"])
        _, plain_key = await edge.admin.create_key(acme.id, [])
        for name, address in stack.addresses.items():
            monkeypatch.setenv(f"OTPGATE_{name.upper()}_ADDR", address)
        for var in ("OTPGATE_TLS_CERT", "OTPGATE_TLS_KEY", "OTPGATE_TLS_CA"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("MONGODB_URI", mongo_uri)
        monkeypatch.setenv("OTPGATE_ADMIN_KEY", admin_key)

        # policies: defaults, then a partial update that leaves the rest alone
        code, out, err = await _cli("--json", "policies", "get", "Acme Shop")
        assert code == 0, err
        before = json.loads(out)["policy"]
        assert before["client_id"] == acme.id

        code, out, err = await _cli(
            "--json", "policies", "set", acme.id, "--sms-fallback", "--daily-sms-cap", "50",
            "--allowed-countries", "de,fr", "--captcha-rule", "sms", "--rate-limit", "phone_daily=10/24h",
        )  # fmt: skip
        assert code == 0, err
        updated = json.loads(out)
        assert updated["updated"] == [
            "allowed_countries", "sms_fallback", "daily_sms_cap", "captcha_rule", "rate_limits.phone_daily",
        ]  # fmt: skip
        policy = updated["policy"]
        assert policy["sms_fallback"] is True and policy["daily_sms_cap"] == 50
        assert policy["allowed_countries"] == ["DE", "FR"] and policy["captcha_rule"] == "CAPTCHA_RULE_SMS"
        assert policy["rate_limits"]["phone_daily"] == {"limit": 10, "window": "86400s"}
        assert policy["default_confirm_days"] == before["default_confirm_days"]

        code, out, err = await _cli("policies", "get", acme.id)  # the table
        assert code == 0, err
        assert "sms_fallback          true" in out and "allowed_countries     DE,FR" in out
        assert "phone_daily=10/1d" in out

        # a webhook secret from a variable; it is never printed back
        monkeypatch.setenv("ACME_WEBHOOK_SECRET", "whsec-0123456789abcdef")
        code, out, err = await _cli(
            "--json", "policies", "set", acme.id, "--webhook-secret-from", "env:ACME_WEBHOOK_SECRET"
        )
        assert code == 0, err
        assert json.loads(out)["policy"]["webhook_secret_set"] is True and "whsec-" not in out

        # refusals come back as one line with the gRPC code and reason
        code, _, err = await _cli("policies", "set", acme.id, "--default-confirm-days", "99999")
        assert code == 1 and "INVALID_ARGUMENT" in err and "default_confirm_days" in err
        code, _, err = await _cli("policies", "get", "no-such-client")
        assert code == 1 and err.startswith("otpgate: NOT_FOUND")
        monkeypatch.setenv("OTPGATE_ADMIN_KEY", plain_key)
        code, _, err = await _cli("policies", "get", acme.id)
        assert code == 1 and "PERMISSION_DENIED" in err
        monkeypatch.setenv("OTPGATE_ADMIN_KEY", admin_key)

        # bots: register an own bot (sandbox Telegram) with the token from a variable, list, remove
        monkeypatch.setenv("OTPGATE_BOT_TOKEN", "7001234:AAHsandboxsecret-token")
        code, out, err = await _cli("--json", "bots", "register", "--owner", acme.id)
        assert code == 0, err
        bot = json.loads(out)["bot"]
        assert bot["owner_client_id"] == acme.id and bot["shared"] is False
        assert "AAHsandboxsecret" not in out

        code, out, err = await _cli("--json", "bots", "list", "--page-size", "1")  # every page is followed
        assert code == 0, err
        assert {b["id"] for b in json.loads(out)["bots"]} == set(stack.commons["botgateway"].shared_bots)
        code, out, err = await _cli("--json", "bots", "list", "--owner", acme.id, "--page-size", "2")
        assert code == 0, err
        listed = {b["id"] for b in json.loads(out)["bots"]}
        assert listed == {bot["id"], *stack.commons["botgateway"].shared_bots}

        code, out, err = await _cli("bots", "list", "--owner", acme.id)
        assert code == 0, err
        assert out.splitlines()[0].split() == ["ID", "USERNAME", "KIND", "OWNER", "CREATED"]
        assert any(line.startswith(bot["id"]) and " own " in line for line in out.splitlines())
        # The owner by name, as `bots register --owner` takes it; an unknown one is said to be unknown.
        code, by_name, err = await _cli("--json", "bots", "list", "--owner", acme.display_name)
        assert code == 0, err
        assert {b["id"] for b in json.loads(by_name)["bots"]} == listed
        code, _, err = await _cli("bots", "list", "--owner", "no-such-client")
        assert code == 1 and err.startswith("otpgate: NOT_FOUND")

        code, out, err = await _cli("--json", "bots", "remove", bot["id"], "--yes")
        assert code == 0, err
        code, out, _ = await _cli("--json", "bots", "list", "--owner", acme.id)
        assert bot["id"] not in {b["id"] for b in json.loads(out)["bots"]}

        # status: the four running services and (sandbox mode) the simulated Telegram the gateway
        # brought are SERVING, verification is not running, the database answers
        code, out, _ = await _cli("--json", "status", "--timeout", "1")
        checks = {c["name"]: c for c in json.loads(out)["checks"]}
        assert code == 1
        assert {n for n, c in checks.items() if c["status"] == "SERVING"} == {*services, "telegramsim"}
        assert checks["verification"]["status"] == "UNREACHABLE"
        assert checks["database"]["status"] == "OK"

        for secret in (admin_key, plain_key, "AAHsandboxsecret", "whsec-0123456789abcdef"):
            assert secret not in captured_logs.text()


async def test_the_ladder_a_clients_gateway_token_and_usage_per_channel(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    from otpgate.delivery.v1 import delivery_pb2, delivery_pb2_grpc

    services = ["telegramsim", "directory", "botgateway", "delivery", "edge"]
    async with running_stack(mongo_client, keyring, services) as stack:
        edge = stack.app("edge")
        acme = await edge.admin.create_client("Acme Shop")
        _, admin_key = await edge.admin.create_key(acme.id, ["admin"])
        for name, address in stack.addresses.items():
            monkeypatch.setenv(f"OTPGATE_{name.upper()}_ADDR", address)
        monkeypatch.setenv("OTPGATE_ADMIN_KEY", admin_key)
        token_file = tmp_path / "token"
        token_file.write_text("my-own-gateway-token-0123456789\n")
        code, out, err = await _cli(
            "--json", "policies", "set", acme.id, "--ladder", "telegram,telegram_gateway:RU+KZ:500:90s,sms",
            "--sms-fallback", "--telegram-gateway-token-from", str(token_file),
        )  # fmt: skip
        assert code == 0, err
        policy = json.loads(out)["policy"]
        assert [s["channel"] for s in policy["ladder"]] == [
            "CHANNEL_TELEGRAM",
            "CHANNEL_TELEGRAM_GATEWAY",
            "CHANNEL_SMS",
        ]
        assert policy["ladder"][1] == {
            "channel": "CHANNEL_TELEGRAM_GATEWAY",
            "countries": ["KZ", "RU"],
            "daily_cap": 500,
            "fallback_after": "90s",
        }
        assert policy["telegram_gateway_token_set"] is True and "my-own-gateway-token" not in out
        code, out, err = await _cli("policies", "get", acme.id)
        assert (
            "telegram (any country) -> telegram_gateway (KZ+RU, 500/day, falls back after 90 s undelivered) -> sms (any country)"
            in out
            and "the client's own" in out
        )
        with pytest.raises(SystemExit) as refused:  # argparse's usage error, exit code 2
            await _cli("policies", "set", acme.id, "--ladder", "fax")
        assert refused.value.code == 2
        code, out, err = await _cli("policies", "set", acme.id, "--ladder", "telegram:::60,sms")
        assert code != 0 and "only the TELEGRAM_GATEWAY rung can fall back" in err + out
        # Usage: the client's own token is not one the Gateway knows (ACCESS_TOKEN_INVALID), so the
        # ladder goes on to SMS, at the sandbox's 0.05 a part.
        delivery = delivery_pb2_grpc.DeliveryServiceStub(stack.channel("delivery"))
        await delivery.SendMessage(
            delivery_pb2.SendMessageRequest(client_id=acme.id, phone="+79990001122", text="Code 1234", code="1234")
        )
        code, out, err = await _cli("usage", "Acme Shop")
        assert code == 0, err
        lines = [line.split() for line in out.splitlines()]
        assert ["total", "sms", "1", "1", "0", "0.0500"] in lines and ["total", "all", "1", "0.0500"] in lines
        code, out, err = await _cli("--json", "usage", acme.id)
        records = json.loads(out)["records"]
        assert [(r["channel"], r["cost"]) for r in records] == [("CHANNEL_SMS", 0.05)]
