"""The operator CLI: --help everywhere, `otpgate status` against real gRPC servers (plain and mTLS)."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2
from otpgate.common.v1 import common_pb2

from services.cli import admin, edge_client, status
from services.cli.main import build_parser, main
from services.core.config import TlsConfig
from services.core.devdb import free_port
from services.core.grpc_server import RunningService, ServiceApp, start_service
from tests.unit.ops.names import COMPOSE, run

EVERY_COMMAND = ["policies", "bots", "status", "clients", "apikeys", "keys", "sandbox", "dev"]


def _leaves(parser: argparse.ArgumentParser, path: list[str]) -> list[list[str]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [path]
    found = []
    for name, child in subs[0].choices.items():
        found += _leaves(child, [*path, name])
    return found


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    leaves = _leaves(build_parser(), [])
    commands = {leaf[0] for leaf in leaves}
    assert set(EVERY_COMMAND) <= commands
    for argv in [[], *leaves, *[[c] for c in commands]]:
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([*argv, "--help"])
        assert exit_info.value.code == 0, argv
        assert "usage: otpgate" in capsys.readouterr().out


async def _serve(tls: TlsConfig | None = None) -> RunningService:
    return await start_service(ServiceApp(name="probe", servicers=[]), "127.0.0.1", 0, tls=tls)


def _status(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, dict]:  # type: ignore[type-arg]
    code = main(["--json", "status", *argv])
    return code, json.loads(capsys.readouterr().out)


async def test_status_reports_serving_not_serving_and_unreachable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    up = await _serve()
    try:
        monkeypatch.setenv("OTPGATE_DIRECTORY_ADDR", up.address)
        monkeypatch.setenv("OTPGATE_EDGE_ADDR", f"127.0.0.1:{free_port()}")
        for var in ("OTPGATE_TLS_CERT", "OTPGATE_TLS_KEY", "OTPGATE_TLS_CA", "MONGODB_URI"):
            monkeypatch.delenv(var, raising=False)

        code, out = await asyncio.to_thread(_status, monkeypatch, capsys, ["--service", "directory", "--no-database"])
        assert code == 0 and out["healthy"] is True
        assert [(c["name"], c["status"]) for c in out["checks"]] == [("directory", "SERVING")]
        # --target overrides the address from the environment
        code, out = await asyncio.to_thread(
            _status, monkeypatch, capsys, ["--service", "edge", "--target", f"edge={up.address}", "--no-database"]
        )
        assert code == 0 and out["checks"][0]["target"] == up.address

        code, out = await asyncio.to_thread(
            _status, monkeypatch, capsys, ["--service", "directory", "--service", "edge", "--timeout", "0.5"]
        )
        checks = {c["name"]: c for c in out["checks"]}
        assert code == 1 and out["healthy"] is False
        assert checks["edge"]["status"] == "UNREACHABLE" and checks["edge"]["error"]
        assert checks["database"]["status"] == "SKIPPED" and checks["database"]["healthy"] is True

        await up.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        code, out = await asyncio.to_thread(_status, monkeypatch, capsys, ["--service", "directory", "--no-database"])
        assert code == 1 and out["checks"][0]["status"] == "NOT_SERVING"
    finally:
        await up.stop(0)


async def test_status_table_lists_every_service_in_order() -> None:
    settings = status.load_settings(
        {f"OTPGATE_{n.upper()}_ADDR": f"127.0.0.1:{free_port()}" for n in status.SERVICE_ORDER}
    )
    checks = await status.collect(settings, status.SERVICE_ORDER, database=False, timeout=0.3)
    table = status.render_table(checks)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["COMPONENT", "TARGET", "STATUS"]
    assert [line.split()[0] for line in lines[1:-1]] == list(status.SERVICE_ORDER)
    assert lines[-1] == "0/6 healthy"  # the five services and, in sandbox mode, the simulated Telegram


def test_status_leaves_the_simulated_telegram_out_in_production() -> None:
    production = status.load_settings({"OTPGATE_ENV": "production"})
    assert "telegramsim" not in production.addresses and not production.sandbox
    assert "telegramsim" in status.load_settings({}).addresses  # dev: sandbox mode by default


async def test_status_pings_the_database_without_printing_its_password(mongo_uri: str) -> None:
    ok = await status.check_database(mongo_uri, 2.0)
    assert ok.status == "OK" and ok.healthy
    bad = await status.check_database(f"mongodb://ops:s3cret-pw@127.0.0.1:{free_port()}/?directConnection=true", 0.3)
    assert bad.status == "UNREACHABLE" and not bad.healthy
    assert "s3cret-pw" not in bad.target + bad.error
    assert bad.target.startswith("mongodb://ops:***@127.0.0.1:")


async def test_status_speaks_mtls_with_the_certificates_of_certs_sh(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    assert run(["bash", str(COMPOSE / "certs.sh"), str(certs)]).returncode == 0
    server_tls = TlsConfig(str(certs / "directory.crt"), str(certs / "directory.key"), str(certs / "ca.crt"))
    up = await _serve(server_tls)
    try:
        address = f"localhost:{up.port}"
        operator = TlsConfig(str(certs / "operator.crt"), str(certs / "operator.key"), str(certs / "ca.crt"))
        check = await status.check_service("directory", address, operator, 3.0)
        assert check.status == "SERVING", check.error
        # Another service's certificate is accepted too (the same CA), which is how healthchecks and callers work.
        peer = TlsConfig(str(certs / "edge.crt"), str(certs / "edge.key"), str(certs / "ca.crt"))
        assert (await status.check_service("directory", address, peer, 3.0)).healthy
        # No client certificate: the server refuses the handshake (mutual TLS).
        anonymous = TlsConfig("", "", str(certs / "ca.crt"))
        refused = await status.check_service("directory", address, anonymous, 1.0)
        assert refused.status == "UNREACHABLE"
        # Plaintext against a TLS port fails as well.
        assert not (await status.check_service("directory", address, TlsConfig("", "", ""), 1.0)).healthy
    finally:
        await up.stop(0)


def test_status_waits_until_healthy_or_gives_up() -> None:
    settings = status.load_settings({"OTPGATE_DIRECTORY_ADDR": f"127.0.0.1:{free_port()}"})
    checks = asyncio.run(status.collect_until_healthy(settings, ["directory"], database=False, timeout=0.2, wait=0.6))
    assert checks[0].status == "UNREACHABLE"


# --- admin command helpers (the calls themselves: tests/integration/ops) ---------------------


def _policy_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["policies", "set", "acme", *argv])


def test_policy_set_sends_only_the_fields_given() -> None:
    policy, paths = admin.build_policy_update(
        _policy_args(
            "--sms-fallback",
            "--daily-sms-cap",
            "0",
            "--allowed-countries",
            "de, fr",
            "--captcha-rule",
            "sms",
            "--rate-limit",
            "phone_daily=10/24h",
            "--rate-limit",
            "session=default",
        )
    )
    assert paths == [
        "allowed_countries",
        "sms_fallback",
        "daily_sms_cap",
        "captcha_rule",
        "rate_limits.phone_daily",
        "rate_limits.session",
    ]
    assert list(policy.allowed_countries) == ["DE", "FR"] and policy.sms_fallback is True
    assert policy.rate_limits.phone_daily.limit == 10 and policy.rate_limits.phone_daily.window.seconds == 86400
    assert policy.rate_limits.session.limit == 0
    _, paths = admin.build_policy_update(_policy_args("--no-sms-fallback", "--fraud-mode", "monitor"))
    assert paths == ["sms_fallback", "fraud_mode"]
    with pytest.raises(edge_client.CliError, match="nothing to change"):
        admin.build_policy_update(_policy_args())


def test_sms_countries_replace_any_and_read_unmistakably(capsys: pytest.CaptureFixture[str]) -> None:
    policy, paths = admin.build_policy_update(_policy_args("--sms-countries", "FR", "--sms-fallback"))
    assert (paths, list(policy.sms_countries)) == (["sms_countries", "sms_fallback"], ["FR"])  # "any" goes
    with pytest.raises(SystemExit):
        _policy_args("--sms-countries", "FR", "--sms-countries-any")
    assert "not allowed with argument" in capsys.readouterr().err

    def shown(**fields: object) -> str:
        return admin.describe_sms_countries(common_pb2.ClientPolicy(**fields))  # type: ignore[arg-type]

    policy_set = common_pb2.SMS_COUNTRIES_SOURCE_POLICY
    assert shown(sms_countries=["FR"], sms_countries_source=policy_set) == "FR only"
    assert shown(sms_countries_any=True, sms_countries_source=policy_set) == "any country"
    assert shown(sms_countries_source=policy_set) == "none (SMS refused)"
    assert shown(sms_countries_any=True, sms_countries_source=common_pb2.SMS_COUNTRIES_SOURCE_SANDBOX_DEFAULT) == (
        "any country - the sandbox default: set --sms-countries for production"
    )
    assert shown(sms_countries_source=common_pb2.SMS_COUNTRIES_SOURCE_SERVICE_DEFAULT) == (
        "none (SMS refused) - the default: no SMS until an operator sets --sms-countries"
    )
    assert shown(sms_countries=["FR", "IT"], service_sms_countries=["DE", "FR"], sms_countries_source=policy_set) == (
        "FR only (set: FR,IT; the service allows DE,FR)"
    )
    assert shown(sms_countries_any=True, service_sms_countries=["DE"], sms_countries_source=policy_set) == (
        "DE only (any country, within the service's list)"
    )


@pytest.mark.parametrize("bad", ["phone=1/1m", "client=10", "client=x/1m", "client=5/0s", "client=5/soon"])
def test_bad_rate_limits_are_refused_by_the_parser(bad: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        admin.parse_rate_limit(bad)


def test_secrets_come_from_files_or_variables_never_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "secret"
    path.write_text("  webhook-secret-0123456789\n")
    assert edge_client.read_secret(str(path), "x") == "webhook-secret-0123456789"
    monkeypatch.setenv("SOME_TOKEN", "123:abc")
    assert edge_client.read_secret("env:SOME_TOKEN", "x") == "123:abc"
    with pytest.raises(edge_client.CliError, match="is empty"):
        edge_client.read_secret("env:MISSING_TOKEN_VAR", "bot token")
    with pytest.raises(edge_client.CliError, match="cannot read"):
        edge_client.read_secret(str(tmp_path / "nope"), "bot token")
    options = {a.dest for a in build_parser()._actions}  # no --token anywhere on the command line
    assert "token" not in options


def test_admin_commands_need_an_admin_key(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("OTPGATE_ADMIN_KEY", raising=False)
    assert main(["bots", "list"]) == 1
    assert "OTPGATE_ADMIN_KEY" in capsys.readouterr().err
    args = build_parser().parse_args(["bots", "list"])
    target = edge_client.edge_target(args, {"OTPGATE_ADMIN_KEY": "k", "OTPGATE_EDGE_ADDR": "edge:50051"})
    assert (target.address, target.admin_key, target.ca_file) == ("edge:50051", "k", "")
    assert edge_client.edge_target(args, {"OTPGATE_ADMIN_KEY": "k"}).address == edge_client.DEFAULT_EDGE_ADDR


def test_an_unreachable_edge_is_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OTPGATE_ADMIN_KEY", "ok_test_key")
    monkeypatch.setenv("OTPGATE_EDGE_ADDR", f"127.0.0.1:{free_port()}")
    for var in ("OTPGATE_TLS_CERT", "OTPGATE_TLS_KEY", "OTPGATE_TLS_CA"):
        monkeypatch.delenv(var, raising=False)
    assert main(["bots", "list", "--timeout", "0.5"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("otpgate: UNAVAILABLE") or err.startswith("otpgate: DEADLINE_EXCEEDED")
    assert "ok_test_key" not in err
    assert len(err.strip().splitlines()) == 1


def test_bot_removal_asks_unless_told(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("OTPGATE_ADMIN_KEY", "k")
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    assert main(["bots", "remove", "acme_bot"]) == 1
    assert "--yes" in capsys.readouterr().err


def test_the_dev_runner_reads_running_bots_from_botgateway_metrics() -> None:
    """`otpgate dev` says it is up once the shared bots run: read off `otpgate_bot_sessions`, as
    botgateway's metrics endpoint writes it."""
    from prometheus_client import CollectorRegistry, Gauge, start_http_server

    from services.cli.dev import running_bots

    registry = CollectorRegistry()
    sessions = Gauge("otpgate_bot_sessions", "Bot sessions.", ("bot", "state"), registry=registry)
    for bot, state in (("smscodes_bot", "running"), ("smsccode_bot", "failed"), ("smsc_code_bot", "standby")):
        for candidate in ("running", "failed", "standby"):
            sessions.labels(bot, candidate).set(1 if candidate == state else 0)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        assert running_bots(port) == {"smscodes_bot"}
    finally:
        server.shutdown()
        thread.join()
    assert running_bots(port) == set()  # nothing listening: none running
