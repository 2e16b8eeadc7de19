"""Build compose/grafana/dashboards/otpgate.json (the provisioned Grafana dashboard).

    python compose/grafana/dashboard.py           write the JSON
    python compose/grafana/dashboard.py --check   fail if the committed JSON differs

The dashboard is code so that panels stay consistent (units, legends, datasource) and the test
run can check that every metric a panel queries is defined by the services.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUTPUT = Path(__file__).resolve().parent / "dashboards" / "otpgate.json"
DATASOURCE = {"type": "prometheus", "uid": "otpgate-prometheus"}
SERVER_ERRORS = "Unknown|Internal|Unavailable|DeadlineExceeded|DataLoss|Unimplemented"
RI = "$__rate_interval"


class Layout:
    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.y = 0
        self.x = 0
        self.row_height = 0
        self.next_id = 1

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {
                "type": "row",
                "title": title,
                "id": self._id(),
                "collapsed": False,
                "panels": [],
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
            }
        )
        self.y += 1

    def _newline(self) -> None:
        if self.x:
            self.y += self.row_height
            self.x = 0
            self.row_height = 0

    def add(self, panel: dict[str, Any], w: int = 8, h: int = 8) -> None:
        if self.x + w > 24:
            self._newline()
        panel["id"] = self._id()
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        panel["datasource"] = DATASOURCE
        self.panels.append(panel)
        self.x += w
        self.row_height = max(self.row_height, h)


def target(expr: str, legend: str, ref: str = "A") -> dict[str, Any]:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


def timeseries(
    title: str,
    targets: list[tuple[str, str]],
    unit: str = "short",
    description: str = "",
    stack: bool = False,
    max_value: float | None = None,
) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "unit": unit,
        "custom": {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 20 if stack else 5,
            "showPoints": "never",
            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        },
    }
    if max_value is not None:
        defaults["max"] = max_value
        defaults["min"] = 0
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "targets": [target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(targets)],
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def stat(
    title: str,
    expr: str,
    legend: str,
    unit: str = "short",
    description: str = "",
    mappings: list[dict[str, Any]] | None = None,
    thresholds: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "targets": [{**target(expr, legend), "instant": True, "range": False}],
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "mappings": mappings or [],
                "thresholds": {"mode": "absolute", "steps": thresholds or [{"color": "green", "value": None}]},
            },
            "overrides": [],
        },
        "options": {
            "colorMode": "background",
            "graphMode": "none",
            "reduceOptions": {"calcs": ["lastNotNull"]},
            "textMode": "value_and_name",
        },
    }


UP_MAPPING = [
    {"type": "value", "options": {"0": {"text": "DOWN", "color": "red"}, "1": {"text": "UP", "color": "green"}}}
]
UP_THRESHOLDS = [{"color": "red", "value": None}, {"color": "green", "value": 1}]


def build() -> dict[str, Any]:
    lay = Layout()

    lay.row("Health")
    lay.add(
        stat(
            "Services (gRPC health)",
            'probe_success{job="otpgate-health"}',
            "{{service}}",
            description="grpc.health.v1 SERVING, probed over mTLS by the blackbox exporter. NOT_SERVING "
            "means the service cannot reach MongoDB.",
            mappings=UP_MAPPING,
            thresholds=UP_THRESHOLDS,
        ),
        w=12,
        h=4,
    )
    lay.add(stat("MongoDB", "mongodb_up", "mongodb", mappings=UP_MAPPING, thresholds=UP_THRESHOLDS), w=4, h=4)
    lay.add(
        stat("Metrics scrape", 'up{job="otpgate"}', "{{service}}", mappings=UP_MAPPING, thresholds=UP_THRESHOLDS),
        w=8,
        h=4,
    )

    lay.row("Messages")
    lay.add(
        timeseries(
            "Messages by status",
            [(f"sum by (status) (rate(otpgate_messages_total[{RI}]))", "{{status}}")],
            unit="reqps",
            stack=True,
            description="Messages reaching each status per second (QUEUED on accept, then HELD, SENT, "
            "DELIVERED, FAILED, EXPIRED, CANCELED).",
        )
    )
    lay.add(
        timeseries(
            "Messages by channel",
            [(f'sum by (channel) (rate(otpgate_messages_total{{status="SENT"}}[{RI}]))', "{{channel}}")],
            unit="reqps",
            stack=True,
            description="Messages sent per second, by the channel used.",
        )
    )
    lay.add(
        timeseries(
            "Messages by bot",
            [(f'sum by (bot) (rate(otpgate_messages_total{{status="SENT",channel="TELEGRAM"}}[{RI}]))', "{{bot}}")],
            unit="reqps",
            stack=True,
            description="Telegram messages sent per second, by bot.",
        )
    )
    lay.add(
        timeseries(
            "Time from accept to sent",
            [
                (f"histogram_quantile(0.5, sum by (le) (rate(otpgate_accept_to_sent_seconds_bucket[{RI}])))", "p50"),
                (f"histogram_quantile(0.99, sum by (le) (rate(otpgate_accept_to_sent_seconds_bucket[{RI}])))", "p99"),
            ],
            unit="s",
            description="From SendMessage accepting a message to its first successful send.",
        ),
        w=12,
    )
    lay.add(
        timeseries(
            "Dispatch lag",
            [
                (f"histogram_quantile(0.5, sum by (le) (rate(otpgate_dispatch_lag_seconds_bucket[{RI}])))", "p50"),
                (f"histogram_quantile(0.99, sum by (le) (rate(otpgate_dispatch_lag_seconds_bucket[{RI}])))", "p99"),
            ],
            unit="s",
            description="How late a due message was claimed by a dispatcher (alert: p99 > 30 s).",
        ),
        w=12,
    )

    lay.row("Verifications")
    lay.add(
        timeseries(
            "Verifications by outcome",
            [(f"sum by (outcome) (rate(otpgate_verifications_total[{RI}]))", "{{outcome}}")],
            unit="reqps",
            description="Verify API events: started, approved, wrong_code, expired, ...",
        )
    )
    lay.add(
        timeseries(
            "Verification conversion",
            [
                (
                    'sum(rate(otpgate_verifications_total{outcome="approved"}[30m])) / '
                    'sum(rate(otpgate_verifications_total{outcome="started"}[30m]))',
                    "30 min",
                ),
                (
                    'sum(rate(otpgate_verifications_total{outcome="approved"}[1d])) / '
                    'sum(rate(otpgate_verifications_total{outcome="started"}[1d]))',
                    "1 day",
                ),
            ],
            unit="percentunit",
            max_value=1,
            description="Approved / started. A drop means codes do not arrive, or codes are requested by someone who "
            "never enters them (SMS pumping).",
        )
    )
    lay.add(
        timeseries(
            "Phone re-confirmations by outcome",
            [(f"sum by (outcome) (rate(otpgate_confirmations_total[{RI}]))", "{{outcome}}")],
            unit="reqps",
            description="Re-confirmation by SMS code typed to the bot.",
        )
    )

    lay.row("Fraud guard and limits")
    lay.add(
        timeseries(
            "Fraud decisions",
            [
                (
                    f'sum by (decision, reason) (rate(otpgate_fraud_decisions_total{{decision!="allow"}}[{RI}]))',
                    "{{decision}} {{reason}}",
                )
            ],
            unit="reqps",
            stack=True,
            description="SMS legs the fraud guard blocked, monitored or sent to CAPTCHA, by reason.",
        )
    )
    lay.add(
        timeseries(
            "Rate-limit rejections",
            [
                (f"sum by (limit) (rate(otpgate_limiter_rejections_total[{RI}]))", "delivery {{limit}}"),
                (f"sum by (limit) (rate(otpgate_edge_limited_total[{RI}]))", "edge {{limit}}"),
            ],
            unit="reqps",
            stack=True,
            description="Requests refused by delivery's and the edge's limits.",
        )
    )
    lay.add(
        timeseries(
            "SMS sent",
            [(f"sum by (provider, outcome) (rate(otpgate_sms_sent_total[{RI}]))", "{{provider}} {{outcome}}")],
            unit="reqps",
            stack=True,
            description="SMS handed to a provider (alert: 3x jump).",
        )
    )

    lay.row("Edge and webhooks")
    lay.add(
        timeseries(
            "API key refusals",
            [(f"sum by (reason) (rate(otpgate_edge_auth_failures_total[{RI}]))", "{{reason}}")],
            unit="reqps",
            stack=True,
            description="Missing, unknown, revoked keys and missing scopes. A burst of unknown keys is credential "
            "stuffing; revoked ones are a client still using an old key.",
        )
    )
    lay.add(
        timeseries(
            "CAPTCHA checks",
            [(f"sum by (outcome) (rate(otpgate_captcha_verifications_total[{RI}]))", "{{outcome}}")],
            unit="reqps",
            stack=True,
        )
    )
    lay.add(
        timeseries(
            "Status webhooks",
            [(f"sum by (outcome) (rate(otpgate_webhooks_total[{RI}]))", "{{outcome}}")],
            unit="reqps",
            stack=True,
            description="Signed status webhooks to clients, by outcome (retried with backoff).",
        )
    )

    lay.row("Bots")
    lay.add(
        timeseries(
            "Bot messages by outcome",
            [(f"sum by (bot, outcome) (rate(otpgate_bot_messages_total[{RI}]))", "{{bot}} {{outcome}}")],
            unit="reqps",
            stack=True,
        )
    )
    lay.add(
        timeseries(
            "Flood waits per bot",
            [(f"sum by (bot) (increase(otpgate_bot_flood_waits_total[{RI}]))", "{{bot}}")],
            description="Telegram flood waits received; steady flood waits mean a bot runs above what "
            "Telegram tolerates.",
        )
    )
    lay.add(
        timeseries(
            "Bot sessions running",
            [
                ('sum by (bot) (otpgate_bot_sessions{state="running"})', "{{bot}} running"),
                ('sum by (bot) (otpgate_bot_sessions{state="failed"})', "{{bot}} failed"),
            ],
            description="Each bot should run on exactly one botgateway replica (lease).",
        )
    )
    lay.add(
        timeseries(
            "Catch-up: getDifference outcomes",
            [
                (f"sum by (bot, kind) (increase(otpgate_bot_differences_total[{RI}]))", "{{bot}} {{kind}}"),
                (f"sum by (bot) (increase(otpgate_bot_updates_replayed_total[{RI}]))", "{{bot}} replayed"),
            ],
            description="How Telegram answered each bot's catch-up (empty, difference, slice; too_long means "
            "updates were lost) and the updates seen again after a restart or handover, not handled twice.",
        )
    )

    lay.row("gRPC")
    lay.add(
        timeseries(
            "Server error ratio per method",
            [
                (
                    f'sum by (grpc_service, grpc_method) (rate(grpc_server_handled_total{{grpc_code=~"{SERVER_ERRORS}"}}[{RI}])) '
                    f"/ sum by (grpc_service, grpc_method) (rate(grpc_server_handled_total[{RI}]))",
                    "{{grpc_service}}/{{grpc_method}}",
                )
            ],
            unit="percentunit",
            description=f"Share of calls ending in {SERVER_ERRORS.replace('|', ', ')} (alert: > 5%). Refusals such as "
            "INVALID_ARGUMENT or RESOURCE_EXHAUSTED are answers, not errors.",
        ),
        w=12,
    )
    lay.add(
        timeseries(
            "Server latency p99 per method",
            [
                (
                    f"histogram_quantile(0.99, sum by (grpc_service, grpc_method, le) "
                    f"(rate(grpc_server_handling_seconds_bucket[{RI}])))",
                    "{{grpc_service}}/{{grpc_method}}",
                )
            ],
            unit="s",
        ),
        w=12,
    )
    lay.add(
        timeseries(
            "Server calls by code",
            [
                (
                    f"sum by (grpc_method, grpc_code) (rate(grpc_server_handled_total[{RI}]))",
                    "{{grpc_method}} {{grpc_code}}",
                )
            ],
            unit="reqps",
            stack=True,
        )
    )
    lay.add(
        timeseries(
            "Client error ratio per method",
            [
                (
                    f'sum by (grpc_service, grpc_method) (rate(grpc_client_handled_total{{grpc_code=~"{SERVER_ERRORS}"}}[{RI}])) '
                    f"/ sum by (grpc_service, grpc_method) (rate(grpc_client_handled_total[{RI}]))",
                    "{{grpc_service}}/{{grpc_method}}",
                )
            ],
            unit="percentunit",
            description="Internal calls as the callers see them (includes deadlines and retries).",
        )
    )
    lay.add(
        timeseries(
            "Client latency p99 per method",
            [
                (
                    f"histogram_quantile(0.99, sum by (grpc_service, grpc_method, le) "
                    f"(rate(grpc_client_handling_seconds_bucket[{RI}])))",
                    "{{grpc_service}}/{{grpc_method}}",
                )
            ],
            unit="s",
        )
    )
    lay.add(
        timeseries(
            "Public API requests by route and code",
            [(f"sum by (route, code) (rate(otpgate_edge_requests_total[{RI}]))", "{{route}} {{code}}")],
            unit="reqps",
            stack=True,
        ),
        w=24,
    )

    return {
        "uid": "otpgate-overview",
        "title": "otpgate",
        "description": "otpgate: messages, verifications, fraud guard, bots, gRPC (compose/grafana/dashboard.py)",
        "tags": ["otpgate"],
        "timezone": "utc",
        "editable": False,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": []},
        "annotations": {"list": []},
        "links": [],
        "panels": lay.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed JSON differs")
    args = parser.parse_args()
    text = render()
    if args.check:
        if OUTPUT.exists() and OUTPUT.read_text() == text:
            return 0
        print(f"{OUTPUT} is out of date: run python compose/grafana/dashboard.py", file=sys.stderr)
        return 1
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
