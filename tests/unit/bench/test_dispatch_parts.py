"""The dispatch scenario's own logic: counting arrivals, lags, the drain rate, the summary line, and
how a stack names a service that runs as two processes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench.dispatch import arrival_counts, drain_rate, lags, parse, plan_of, summary_line
from services.cli.dev import ProcessStack

SUMMARY = re.compile(r"^bench dispatch: lag_p99=\d+\.\d\d drain/inline=\d+\.\d\d$")


def test_every_accepted_message_is_counted_once_twice_or_lost() -> None:
    accepted = {"a": 100.0, "b": 100.5, "c": 101.0}
    arrivals = [("a", 100.4), ("b", 101.5), ("b", 103.0), ("stranger", 99.0)]
    counts = arrival_counts(accepted, arrivals)
    assert counts == {
        "accepted": 3,
        "arrived": 2,
        "twice": 1,
        "lost": 1,
        "first_send": 100.4,
        "last_send": 103.0,
    }


def test_lag_is_the_first_arrival_after_the_create_time() -> None:
    accepted = {f"m{i}": float(i) for i in range(100)}
    arrivals = [(f"m{i}", i + (5.0 if i == 99 else 0.25)) for i in range(100)]
    arrivals.append(("m0", 60.0))  # a repeat does not make the first arrival later
    result = lags(accepted, arrivals)
    assert result["p50_s"] == 0.25
    assert result["max_s"] == 5.0
    assert result["p99_s"] == 0.25  # rank 98 of 100: the one slow message is the max, not p99


def test_drain_rate_counts_the_gaps_between_the_first_and_the_last_send() -> None:
    assert drain_rate({"arrived": 101, "first_send": 10.0, "last_send": 12.0}) == 50.0
    assert drain_rate({"arrived": 1, "first_send": 10.0, "last_send": 10.0}) == 0.0


def test_summary_line_is_well_formed() -> None:
    line = summary_line({"steady": {"p99_s": 0.4321}, "drain_inline_ratio": 0.876})
    assert SUMMARY.match(line), line
    assert line == "bench dispatch: lag_p99=0.43 drain/inline=0.88"


def test_plan_takes_the_sizes_given() -> None:
    plan = plan_of(parse(["--tiny", "--backlog", "50"]))
    assert plan.backlog == 50 and plan.seconds == 2.0
    assert plan_of(parse([])).rate == 20.0 and plan_of(parse([])).backlog == 2400


def test_a_service_with_a_replica_is_called_through_both_processes(tmp_path: Path) -> None:
    ports = {name: 5000 + i for i, name in enumerate(("telegramsim", "directory", "verification", "delivery"))}
    ports |= {"botgateway": 5010, "edge": 5011}
    stack = ProcessStack(env={}, log_dir=tmp_path, ports=ports, metrics_ports={k: v + 100 for k, v in ports.items()})
    assert stack.target("delivery") == "127.0.0.1:5003"
    stack.add_replica("delivery-2", "delivery", 6000, 6001)
    assert stack.target("delivery") == "ipv4:127.0.0.1:5003,127.0.0.1:6000"
    assert stack.service_env()["OTPGATE_DELIVERY_ADDR"] == "ipv4:127.0.0.1:5003,127.0.0.1:6000"
    assert stack.target("edge") == "127.0.0.1:5011"
    assert (stack.grpc_port("delivery-2"), stack.metrics_port("delivery-2")) == (6000, 6001)
    with pytest.raises(ValueError):
        stack.add_replica("edge", "delivery", 6002, 6003)
