"""Generate the configuration reference (docs/configuration.md) from the config definitions.

Every service reads its settings through services.core.config.Env, which records each variable
with its help text, default and secrecy in SETTINGS. This tool loads the common configuration and
each service's `load_config` with an empty environment (nothing is started, nothing connects),
then writes one table per group of variables.

    python tools/configref.py            write docs/configuration.md
    python tools/configref.py --check    fail if docs/configuration.md differs (drift check)
    python tools/configref.py --json     print the settings as JSON (for scripts and tests)
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import sys
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

from services.core.config import (  # noqa: E402
    DEFAULT_PORTS,
    SETTINGS,
    SIMULATOR,
    SIMULATOR_PORT,
    Env,
    Setting,
    load_common,
)

OUTPUT = ROOT / "docs" / "configuration.md"
SERVICES = ("edge", "delivery", "verification", "directory", "botgateway", SIMULATOR)


def collect() -> dict[str, Setting]:
    """Every setting the services declare (common ones and their own), the simulated Telegram's too."""
    SETTINGS.clear()
    missing = []
    for name in SERVICES:
        env = Env({}, service=name)
        load_common(name, env)
        try:
            module = importlib.import_module(f"services.{name}.app")
        except ModuleNotFoundError as exc:
            if exc.name != f"services.{name}.app":
                raise
            missing.append(name)
            continue
        module.load_config(env)
    if missing:
        raise SystemExit(f"configref: no services/<svc>/app.py for {', '.join(missing)}")
    return dict(SETTINGS)


def cli_settings() -> list[tuple[str, str, str]]:
    """(name, default, help) of variables only the operator CLI reads."""
    from services.cli.edge_client import CLI_ENVIRONMENT

    return list(CLI_ENVIRONMENT)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(setting: Setting) -> str:
    if setting.default is None:
        return "**required**"
    if setting.secret:
        return "*(empty)*"
    if setting.default == "":
        return "*(empty)*"
    return f"`{_cell(setting.default)}`"


def _table(settings: list[Setting]) -> list[str]:
    lines = ["| Variable | Default | Description |", "|---|---|---|"]
    for s in sorted(settings, key=lambda s: s.name):
        help_text = _cell(s.help)
        if s.secret:
            help_text += " (secret)"
        lines.append(f"| `{s.name}` | {_default(s)} | {help_text} |")
    return lines


# The SMS providers' own variables, each under its provider (chosen by OTPGATE_SMS_PROVIDER).
SMS_PROVIDERS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "smsc",
        "OTPGATE_SMSC_",
        (
            "The smsc.ru HTTP API (send.php, status.php with fmt=3). Delivery reports are polled",
            "(`OTPGATE_SMS_STATUS_POLL`); the parts of a long text are what smsc.ru answers (`cnt`).",
        ),
    ),
    (
        "webhook",
        "OTPGATE_SMS_WEBHOOK_",
        (
            'Your own gateway: a signed JSON POST per SMS (`{"id", "to", "text", "sender"}`, headers',
            "`X-Otpgate-Timestamp`, `X-Otpgate-Signature`, `Idempotency-Key`), answered 2xx.",
        ),
    ),
    (
        "smpp",
        "OTPGATE_SMPP_",
        (
            "An SMSC over SMPP 3.4: one transceiver bind (`system_id`, `password`, `system_type`), kept",
            "up with `enquire_link` and reconnected with backoff. Needs `OTPGATE_SMPP_HOST`,",
            "`OTPGATE_SMPP_SYSTEM_ID` and `OTPGATE_SMPP_PASSWORD`.",
            "",
            "- Sender: `OTPGATE_SMS_SENDER`; a name (ASCII, up to 11 characters) goes as TON 5 / NPI 0,",
            "  digits as TON 1 / NPI 1, unless `OTPGATE_SMPP_SOURCE_TON`/`_NPI` say otherwise.",
            "- Every `submit_sm` asks for a delivery receipt; receipts come back on the same bind",
            "  (`receipted_message_id`/`message_state` TLVs, else the receipt text) and make the message",
            "  DELIVERED (every part delivered) or FAILED (a part failed).",
            "- GSM-7 when every character is in the GSM 03.38 alphabet, else UCS-2; a longer text goes as",
            "  UDH-concatenated parts (153 GSM-7 / 67 UCS-2 characters each), each billed and counted as",
            "  one SMS in usage.",
            "- `OTPGATE_SMPP_WINDOW` and `OTPGATE_SMPP_TPS` are what the SMSC contract allows: submits",
            "  outstanding at once, and per second.",
            "- ESME_RTHROTTLED / ESME_RMSGQFUL: retried after `OTPGATE_SMPP_THROTTLE_BACKOFF`, and nothing",
            "  new is sent meanwhile. A refused destination or message fails the message (SMS_FAILED);",
            "  statuses listed in `OTPGATE_SMPP_RETRY_STATUSES` are retried instead. No bind (cannot",
            "  connect, bind refused): the message waits and is retried while its ttl lasts; the message",
            "  records `sms_error` SMPP_BIND_REFUSED, SMPP_CONNECT_FAILED, ... and `otpgate_smpp_link_up`",
            "  is 0.",
            "- A submit left unanswered when the connection drops is sent again after the next bind;",
            "  one the SMSC answered is never sent again, nor are the parts of a long text it took.",
            "  (An SMSC that took a submit and lost its answer in the drop gets it twice: SMPP 3.4 cannot",
            "  tell the two apart.)",
        ),
    ),
)


GATEWAY_PREFIX = "OTPGATE_TELEGRAM_GATEWAY_"
GATEWAY_INTRO = (
    "Telegram's Gateway API (channel `CHANNEL_TELEGRAM_GATEWAY`, and the Gateway rung of a ladder):",
    'a verification code from Telegram\'s "Verification Codes" chat to any Telegram account, by number.',
    "Each message asks `checkSendAbility` (charged once; a number without Telegram is refused for free)",
    "and sends with its `request_id`; a send without an answer is resolved with",
    "`checkVerificationStatus` and never sent again, nor over another channel. A service-wide token",
    "(`OTPGATE_TELEGRAM_GATEWAY_TOKEN`) serves every client; a client's own account is set with",
    "`otpgate policies set CLIENT --telegram-gateway-token-from SOURCE` (sealed in its policy) and wins.",
    "Delivery reports come to the edge's `POST /v1/telegramGateway/reports`: set",
    "`OTPGATE_TELEGRAM_GATEWAY_CALLBACK_URL` to its public HTTPS address; each report's signature is",
    "checked with the token it was sent with, and one stamped more than",
    "`OTPGATE_TELEGRAM_GATEWAY_REPORT_MAX_AGE` from our clock is refused. Without a callback URL the",
    "statuses are polled (`OTPGATE_SMS_STATUS_POLL`). In sandbox mode all of it points at the local",
    "Gateway of the simulated Telegram (`OTPGATE_TELEGRAMSIM_GATEWAY_PORT`), with its own account.",
)


def _gateway(settings: list[Setting]) -> list[str]:
    own = [s for s in settings if s.name.startswith(GATEWAY_PREFIX)]
    return ["### Telegram Gateway", "", *GATEWAY_INTRO, "", *_table(own), ""]


def _providers(settings: list[Setting]) -> list[str]:
    out = [
        "### SMS providers",
        "",
        "`OTPGATE_SMS_PROVIDER` picks one; `sandbox` (the default in sandbox mode) keeps every SMS in",
        "an inbox readable at `/sandbox/v1/sms` and needs nothing else.",
        "",
    ]
    for name, prefix, intro in SMS_PROVIDERS:
        out += [f"#### `{name}`", "", *intro, "", *_table([s for s in settings if s.name.startswith(prefix)]), ""]
    return out


def render(settings: dict[str, Setting]) -> str:
    everywhere = [s for s in settings.values() if set(s.services) >= set(SERVICES)]
    by_service: dict[str, list[Setting]] = {name: [] for name in SERVICES}
    shared_by_some: list[Setting] = []
    for s in settings.values():
        if set(s.services) >= set(SERVICES):
            continue
        if len(s.services) == 1 and s.services[0] in by_service:
            by_service[s.services[0]].append(s)
        else:
            shared_by_some.append(s)
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by tools/configref.py from the config definitions; do not edit by hand.",
        "     Regenerate with `python tools/configref.py`; the test run fails when this file drifts. -->",
        "",
        "otpgate is configured with environment variables only. Each service reads its variables at",
        "start-up, checks them all and, if any is missing or invalid, exits with one message that lists",
        "every problem (exit code 2). Unset and empty mean the same: the default applies.",
        "",
        "- **required**: the service refuses to start without it.",
        "- (secret): never logged, never printed back in an error. Keep secrets in env files that are",
        "  not committed (compose: `compose/*.env`, see docs/operations.md).",
        "- Lists are comma-separated. Flags take `true/false`, `1/0`, `yes/no` or `on/off`.",
        "- `OTPGATE_ENV=production` refuses dev shortcuts: the sandbox cannot be on, keys are required.",
        "  Defaults shown are those of an empty environment, i.e. `OTPGATE_ENV=dev` (where",
        "  `OTPGATE_SANDBOX` defaults to `true`; in production it defaults to `false`).",
        "",
        f"{len(settings)} variables in total.",
        "",
        "## Every service",
        "",
        "Read by every service (each also has its own `OTPGATE_<SERVICE>_...` variables below).",
        "",
        *_table(everywhere),
        "",
    ]
    if shared_by_some:
        out += [
            "## Shared by several services",
            "",
            *_table(shared_by_some),
            "",
        ]
    for name in SERVICES:
        port = SIMULATOR_PORT if name == SIMULATOR else DEFAULT_PORTS[name]
        prefixes = (*(p for _, p, _ in SMS_PROVIDERS), GATEWAY_PREFIX)
        own = [s for s in by_service[name] if not s.name.startswith(prefixes)]
        only = (
            " Dev and sandbox mode only: the simulated Telegram; it refuses to start in production."
            if name == SIMULATOR
            else ""
        )
        out += [
            f"## {name}",
            "",
            f"`python -m services.{name}` (gRPC port {port} by default).{only}",
            "",
            *_table(own),
            "",
        ]
        if name == "delivery":
            out += _providers(by_service[name])
            out += _gateway(by_service[name])
    out += [
        "## Operator CLI (`otpgate`)",
        "",
        "The CLI reads the services' variables where it needs them (`otpgate status`: the",
        "`OTPGATE_<SERVICE>_ADDR` addresses, `OTPGATE_TLS_*`, `MONGODB_URI`; `otpgate keys rotate` and",
        "`otpgate clients`: `MONGODB_URI`, `OTPGATE_KEYS`, the database names) plus these:",
        "",
        "| Variable | Default | Description |",
        "|---|---|---|",
        *[
            f"| `{name}` | {f'`{default}`' if default else '*(empty)*'} | {_cell(help_text)} |"
            for name, default, help_text in cli_settings()
        ],
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="fail if the committed reference differs")
    mode.add_argument("--json", action="store_true", help="print every setting as JSON")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="where the reference is (default docs/)")
    args = parser.parse_args(argv)
    settings = collect()
    if args.json:
        print(json.dumps({name: asdict(s) for name, s in sorted(settings.items())}, indent=2))
        return 0
    text = render(settings)
    shown = args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current == text:
            print(f"configref: {shown} is up to date ({len(settings)} variables)")
            return 0
        diff = difflib.unified_diff(current.splitlines(), text.splitlines(), "committed", "generated", lineterm="", n=1)
        print("\n".join(diff))
        print(
            f"configref: {shown} is out of date; run `python tools/configref.py`",
            file=sys.stderr,
        )
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"configref: wrote {shown} ({len(settings)} variables)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
