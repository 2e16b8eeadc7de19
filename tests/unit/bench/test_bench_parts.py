"""The benchmark's own logic: command shapes, ceiling send plans, percentiles, the summary line."""

from __future__ import annotations

import re
from collections import Counter

from bench.__main__ import cpu_ms_per_message, summary_line, table
from bench.instrument import shape
from bench.scenarios import ceiling_plans, ceiling_sends, percentile
from bench.system import SHARED_BOTS, User, counts_delta, prometheus_samples

SUMMARY = re.compile(
    r"^bench: pipeline/floor=\d+\.\d\d pipeline/floor_min=\d+\.\d\d cpu_ms_per_msg=\d+\.\d\d "
    r"db_ops_per_msg=\d+\.\d\d verify/send=\d+\.\d\d bot/limit=\d+\.\d\d pool/limit=\d+\.\d\d flood_errors=\d+$"
)


def test_command_shapes_tell_key_lookups_from_scans() -> None:
    assert shape("find", {"find": "m", "filter": {"_id": "a"}}) == "id"
    assert shape("find", {"find": "m", "filter": {"_id": {"$in": ["a", "b"]}}}) == "id"
    assert shape("find", {"find": "s", "filter": {"phone_bi": "x"}}) == "scan"
    assert shape("findAndModify", {"findAndModify": "m", "query": {"_id": "a", "lease": {"$lt": 1}}}) == "idplus"
    assert shape("update", {"update": "m", "updates": [{"q": {"_id": "a"}, "u": {}}]}) == "id"
    assert shape("delete", {"delete": "m", "deletes": [{"q": {"exp": {"$lt": 1}}}]}) == "scan"
    assert shape("aggregate", {"aggregate": "l", "pipeline": [{"$match": {"w": "k"}}, {"$group": {}}]}) == "scan"
    assert shape("insert", {"insert": "m", "documents": []}) == "-"


def test_pool_sends_give_each_bot_a_third_through_bots_the_person_started() -> None:
    users = [User(i + 1, f"+7999{i:07d}", plan) for i, plan in enumerate(ceiling_plans(30))]
    sends = ceiling_sends(users, 90, pool=True)
    assert len(sends) == 90
    assert Counter(bot for _, bot in sends) == {bot: 30 for bot in SHARED_BOTS}
    assert all(bot in user.bots for user, bot in sends)
    assert Counter(user.user_id for user, _ in sends) == {user.user_id: 3 for user in users}
    single = ceiling_sends(users, 90, pool=False)
    assert {bot for _, bot in single} == {SHARED_BOTS[0]}
    assert all(SHARED_BOTS[0] in user.bots for user in users)


def test_percentile_and_counts_delta() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) in (50.0, 51.0)
    assert percentile(values, 99) == 99.0
    before = {"delivery": {"db.m:insert:-": 3}}
    after = {"delivery": {"db.m:insert:-": 10, "db.l:aggregate:scan": 2}, "edge": {}}
    assert counts_delta(after, before) == {"delivery|db.m:insert:-": 7, "delivery|db.l:aggregate:scan": 2}


def test_summary_line_is_well_formed_with_and_without_results() -> None:
    assert SUMMARY.match(summary_line({}))
    cpu = {"edge": 10.0, "delivery": 20.0, "directory": 5.0, "botgateway": 5.0, "verification": 0.0}
    report = {
        "pipeline": {
            "send": [
                {"concurrency": 4, "rate": 40.0, "service_cpu_pct": {**cpu, "telegramsim": 9.0, "database": 30.0}},
                {"concurrency": 16, "rate": 100.0, "service_cpu_pct": {k: v * 2 for k, v in cpu.items()}},
            ],
            "floor": [{"concurrency": 4, "rate": 50.0}, {"concurrency": 16, "rate": 200.0}],
            "verify": [{"concurrency": 16, "rate": 30.0}],
            "op_mix": {"total_per_message": 9.5},
        },
        "ceiling": {"one_bot": {"ratio": 0.97, "flood_errors": 0}, "pool": {"ratio": 0.96, "flood_errors": 1}},
    }
    line = summary_line(report)
    assert SUMMARY.match(line)
    # Best send ÷ best floor 0.50, worst level 0.50 (16: 100/200); CPU at the busiest level (16):
    # 80 % of a core over 100 msg/s = 8 ms, the simulated Telegram and the database left out.
    assert line == (
        "bench: pipeline/floor=0.50 pipeline/floor_min=0.50 cpu_ms_per_msg=8.00 db_ops_per_msg=9.50 "
        "verify/send=0.30 bot/limit=0.97 pool/limit=0.96 flood_errors=1"
    )
    per = cpu_ms_per_message(report["pipeline"]["send"][0])
    assert per == {
        "edge": 2.5,
        "delivery": 5.0,
        "directory": 1.25,
        "botgateway": 1.25,
        "verification": 0.0,
        "total": 10.0,
    }
    assert isinstance(table({}), str)


def test_prometheus_samples_read_labels_and_the_table_prints_the_verify_pair_mix() -> None:
    text = (
        "# HELP grpc_server_started_total RPCs started on the server.\n"
        'grpc_server_started_total{grpc_method="SendMessage",grpc_service="otpgate.delivery.v1.DeliveryService",'
        'grpc_type="unary"} 12.0\n'
        'grpc_server_started_created{grpc_method="SendMessage"} 1.7e9\n'
        "otpgate_bot_flood_waits_total 2.0\n"
    )
    assert prometheus_samples(text, "grpc_server_started_total") == [
        (
            {"grpc_method": "SendMessage", "grpc_service": "otpgate.delivery.v1.DeliveryService", "grpc_type": "unary"},
            12.0,
        )
    ]
    assert prometheus_samples(text, "otpgate_bot_flood_waits_total") == [({}, 2.0)]
    mix = {
        "per_operation": {"verification|db.code_slots:insert:-": 3.0},
        "total_per_operation": 3.0,
        "rpc_per_operation": {"delivery.SendMessage": 1.0},
        "rpc_total_per_operation": 1.0,
        "mean_ms": {"verification|db.code_slots:insert:-": 1.5},
        "ms_per_operation": 4.5,
    }
    printed = table({"pipeline": {"verify_mix": mix}})
    assert "per Verify pair: 3.0 (~4.5 ms" in printed
    assert "  3.00      1.5  verification|db.code_slots:insert:-" in printed
    assert "gRPC calls served: 1.0" in printed and "1.00           delivery.SendMessage" in printed
