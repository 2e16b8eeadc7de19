"""What the code defines, for cross-checking the ops files: metrics, labels, label values, env vars."""

from __future__ import annotations

import functools
import importlib
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
from prometheus_client import REGISTRY

from services.core.metrics import code_label

ROOT = Path(__file__).resolve().parents[3]
COMPOSE = ROOT / "compose"
SERVICES = ("edge", "delivery", "verification", "directory", "botgateway")
# Metrics that come from Prometheus itself and the exporters the compose file runs.
EXTERNAL_METRICS = {"up", "probe_success", "probe_ssl_earliest_cert_expiry", "mongodb_up"}
_SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


@dataclass(frozen=True)
class MetricDef:
    name: str  # a sample name as Prometheus sees it, e.g. otpgate_messages_total
    labels: frozenset[str]


@functools.cache
def code_metrics() -> dict[str, MetricDef]:
    """Every sample name the services can expose (imports every service's metrics and app modules)."""
    importlib.import_module("services.core.metrics")
    for svc in SERVICES:
        for module in ("metrics", "app"):
            importlib.import_module(f"services.{svc}.{module}")
    result: dict[str, MetricDef] = {}
    for name, collector in REGISTRY._names_to_collectors.items():
        labels = frozenset(getattr(collector, "_labelnames", ()))
        if name.endswith("_bucket"):
            labels |= {"le"}
        result[name] = MetricDef(name, labels)
    return result


@functools.cache
def code_corpus() -> str:
    """The services' Python sources and the protos, to look label values and variable names up in."""
    parts = [p.read_text() for p in sorted((ROOT / "services").rglob("*.py"))]
    parts += [p.read_text() for p in sorted((ROOT / "protos" / "otpgate").rglob("*.proto"))]
    return "\n".join(parts)


def value_in_code(label: str, value: str) -> bool:
    if label == "grpc_code":
        return value in {code_label(code) for code in grpc.StatusCode}
    corpus = code_corpus()
    return f'"{value}"' in corpus or f"_{value} =" in corpus or f"'{value}'" in corpus


_SELECTOR = re.compile(r"(?<![A-Za-z0-9_:])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_PROMQL_WORDS = {
    "sum",
    "by",
    "without",
    "rate",
    "increase",
    "irate",
    "histogram_quantile",
    "max",
    "min",
    "avg",
    "count",
    "and",
    "or",
    "unless",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "absent",
    "vector",
    "humanize",
    "bool",
    "topk",
    "bottomk",
    "clamp_min",
    "clamp_max",
    "abs",
    "delta",
    "deriv",
    "le",
}


@dataclass(frozen=True)
class Selector:
    metric: str
    matchers: tuple[tuple[str, str, str], ...]


def selectors(expr: str) -> list[Selector]:
    """Metric selectors of a PromQL expression (metric names with their label matchers)."""
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range windows
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    found = []
    for match in _SELECTOR.finditer(expr):
        name, braces = match.group(1), match.group(2) or ""
        start = match.start(1)
        if name in _PROMQL_WORDS or (start > 0 and expr[start - 1] in ":$"):
            continue
        if expr[match.end(1) : match.end(1) + 1] == "(":  # a function call
            continue
        if ":" in name or re.fullmatch(r"\d.*", name):
            continue
        matchers = tuple((m.group(1), m.group(2), m.group(3)) for m in _MATCHER.finditer(braces))
        found.append(Selector(name, matchers))
    return found


def check_expression(expr: str, recorded: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
    """Problems with an expression: unknown metrics, labels the metric lacks, label values the code never sets."""
    problems = []
    metrics = code_metrics()
    for sel in selectors(expr):
        if sel.metric in recorded or sel.metric in EXTERNAL_METRICS:
            continue
        definition = metrics.get(sel.metric)
        if definition is None:
            problems.append(f"{sel.metric}: no such metric in the code")
            continue
        for label, op, value in sel.matchers:
            if label in {"job", "instance", "service"}:  # target labels from prometheus.yml
                continue
            if label not in definition.labels:
                problems.append(f"{sel.metric}: no label {label!r} (has {sorted(definition.labels)})")
                continue
            if op in ("=", "=~"):
                values = value.split("|") if op == "=~" else [value]
                for v in values:
                    if re.fullmatch(r"[A-Za-z0-9_]+", v) and not value_in_code(label, v):
                        problems.append(f"{sel.metric}{{{label}}}: value {v!r} is never set by the code")
    return problems


@functools.cache
def declared_settings() -> dict[str, dict[str, object]]:
    """tools/configref.py --json: every variable the services declare (in a fresh interpreter)."""
    import json

    result = run([PYTHON, str(ROOT / "tools" / "configref.py"), "--json"])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def promtool() -> str | None:
    import os
    import shutil

    found = shutil.which("promtool")
    if found is None and os.environ.get("CI"):
        raise AssertionError("promtool is required in CI: apt-get install -y prometheus (Debian) provides it")
    return found


def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload, no-any-return]


PYTHON = sys.executable
