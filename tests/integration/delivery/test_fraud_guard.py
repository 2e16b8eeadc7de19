"""The SMS fraud guard through delivery's API, in block mode on the real dev database: no free
allowance, CAPTCHA before refusal, attacked ranges and their CAPTCHA budget, requesters asking for
many numbers, conversion per client and country, operators' rules, guard events, monitor mode."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
from otpgate.common.v1 import common_pb2
from otpgate.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from prometheus_client import REGISTRY
from pymongo import AsyncMongoClient

from services.core.clock import ManualClock
from services.core.crypto import Keyring
from services.core.errors import parse_rpc_error
from services.core.mongo import Document
from tests.integration.delivery.support import QUIET, refused, sms_request, stubs
from tests.support.stack import running_stack

VERIFY = delivery_pb2.MESSAGE_PURPOSE_VERIFICATION
BLOCKING = {**QUIET, "OTPGATE_FRAUD_MODE": "block"}
SHOWS_CAPTCHA = {"captcha_possible": True}
SOLVED = {"captcha_possible": True, "captcha_verified": True}


class Client:
    """A client's backend calling delivery for its users (one end-user address per call)."""

    def __init__(self, delivery: delivery_pb2_grpc.DeliveryServiceAsyncStub, client_id: str = "shop") -> None:
        self.delivery = delivery
        self.client_id = client_id
        self.sent: list[str] = []

    async def send(self, phone: str, ip: str = "", **origin: Any) -> tuple[str, dict[str, str], str]:
        """("SENT", {}, message id) or (reason, ErrorInfo metadata, message)."""
        request = sms_request(
            phone, client_id=self.client_id, purpose=VERIFY, origin=common_pb2.Origin(ip=ip, **origin)
        )
        try:
            reply = await self.delivery.SendMessage(request)
        except grpc.aio.AioRpcError as error:
            failure = parse_rpc_error(error)
            return failure.reason, failure.metadata, failure.message
        self.sent.append(reply.message.id)
        return "SENT", {}, reply.message.id

    async def enter_codes(self) -> None:
        for message_id in self.sent:
            await self.delivery.RecordConversion(
                delivery_pb2.RecordConversionRequest(client_id=self.client_id, message_id=message_id)
            )
        self.sent.clear()


@asynccontextmanager
async def guard(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock, **env: str
) -> AsyncIterator[delivery_pb2_grpc.DeliveryServiceAsyncStub]:
    overrides = {**BLOCKING, **env}
    async with running_stack(mongo_client, keyring, ["delivery"], overrides=overrides, clock=clock) as stack:
        delivery, _ = stubs(stack)
        yield delivery


RANGES = ("1512", "1520", "1522", "1523", "1525", "1570", "1573", "1575", "1577", "1590")
RANGES += ("1602", "1622", "1703", "1715", "1727", "1738", "1752", "1767", "1778", "1795")


def de(n: int) -> str:
    """A German mobile number: distinct n fall into distinct ranges (and prefixes) for n < 2000."""
    return f"+49{RANGES[n % 20]}{n // 20 % 100:02d}{n * 7919 % 100_000:05d}"


def ip(n: int) -> str:
    """An end-user address in a network of its own (no two n share a /24)."""
    return f"{11 + n % 200}.{n // 200 % 256}.{n % 251}.{n % 250 + 1}"


async def test_no_free_allowance_a_captcha_before_a_refusal_and_answered_codes_clear_the_way(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock, captured_logs: Any
) -> None:
    async with guard(mongo_client, keyring, clock) as delivery:
        shop = Client(delivery)
        # Cold start: one number in a fresh prefix is nothing unusual, nor is its person asking again.
        assert (await shop.send("+4915112340001", ip(1), **SHOWS_CAPTCHA))[0] == "SENT"
        assert (await shop.send("+4915112340001", ip(1), **SHOWS_CAPTCHA))[0] == "SENT"
        # A second number of the same prefix, unanswered so far: a CAPTCHA where one can be shown ...
        reason, metadata, message = await shop.send("+4915112347777", ip(2), **SHOWS_CAPTCHA)
        assert (reason, metadata["signal"]) == ("CAPTCHA_REQUIRED", "PREFIX_VELOCITY")
        assert float(metadata["score"]) >= 3.0 and "no code entered" in message
        # ... a refusal, saying which signal decided, where none can be; counted by that signal.
        refusals = {"decision": "block", "reason": "PREFIX_VELOCITY"}
        before = REGISTRY.get_sample_value("otpgate_fraud_decisions_total", refusals) or 0.0
        reason, metadata, message = await shop.send("+4915112347777", ip(2))
        assert (reason, metadata["signal"]) == ("FRAUD_SUSPECTED", "PREFIX_VELOCITY")
        assert REGISTRY.get_sample_value("otpgate_fraud_decisions_total", refusals) == before + 1
        assert message.startswith("SMS refused by the fraud guard: many recent requests for numbers in this range")
        # Solved: the person gets the code.
        assert (await shop.send("+4915112347777", ip(2), **SOLVED))[0] == "SENT"
        # Ordinary traffic in other prefixes passes.
        for n in range(5):
            assert (await shop.send(de(n), ip(10 + n), **SHOWS_CAPTCHA))[0] == "SENT"
        # Codes entered: the prefix's next person is no surprise any more.
        await shop.enter_codes()
        assert (await shop.send("+4915112343333", ip(3), **SHOWS_CAPTCHA))[0] == "SENT"
        logs = captured_logs.text()
        assert '"reason": "PREFIX_VELOCITY"' in logs and "+4915112347777" not in logs


async def test_an_attacked_range_refuses_even_solved_captchas_beyond_its_budget_and_operators_override(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock, captured_logs: Any
) -> None:
    async with guard(mongo_client, keyring, clock, OTPGATE_FRAUD_ATTACKED_BUDGET="2") as delivery:
        shop, attacker = Client(delivery), Client(delivery)
        outcomes = [(await attacker.send(f"+491519876{n:04d}", ip(100 + n), **SHOWS_CAPTCHA))[:2] for n in range(30)]
        clock.advance(31)  # an event's counts are written again at most every 30 s
        outcomes.append((await attacker.send("+4915198760031", ip(131), **SHOWS_CAPTCHA))[:2])
        sent = [reason for reason, _ in outcomes if reason == "SENT"]
        assert len(sent) == 1  # the first number; every later one of the run is asked for a CAPTCHA
        signals = {metadata["signal"] for reason, metadata in outcomes if reason != "SENT"}
        assert signals <= {"PREFIX_VELOCITY", "SEQUENTIAL_NUMBERS"}
        # A person in the attacked range who solves a CAPTCHA still gets a code, while its budget lasts.
        assert (await shop.send("+4915198764321", ip(7), **SOLVED))[0] == "SENT"
        assert (await shop.send("+4915198765432", ip(8), **SOLVED))[0] == "SENT"
        reason, metadata, message = await shop.send("+4915198766543", ip(9), **SOLVED)
        assert reason == "FRAUD_SUSPECTED" and "allowance for the hour is spent" in message
        # The budget counts codes nobody entered: once those two people type theirs, the next gets one.
        await shop.enter_codes()
        assert (await shop.send("+4915198766543", ip(9), **SOLVED))[0] == "SENT"
        assert (await shop.send("+4915198767654", ip(10), **SOLVED))[0] == "SENT"
        assert (await shop.send("+4915198768765", ip(12), **SOLVED))[0] == "FRAUD_SUSPECTED"

        events = await delivery.ListFraudEvents(delivery_pb2.ListFraudEventsRequest())
        prefix = next(e for e in events.events if e.value == "+491519876")
        assert prefix.kind == common_pb2.FRAUD_EVENT_KIND_PREFIX and prefix.state == common_pb2.FRAUD_STATE_BLOCK
        assert prefix.requests >= 30 and prefix.entered == 0 and prefix.region == "DE"
        assert prefix.signal in {"PREFIX_VELOCITY", "SEQUENTIAL_NUMBERS"} and prefix.score >= 9
        # A second event (a fresh prefix's second number, unanswered): pages add up to the list,
        # another client sees none of shop's, and a token keeps its filter.
        clock.advance(1)
        assert (await shop.send("+4916012340001", ip(40)))[0] == "SENT"
        assert (await shop.send("+4916012347777", ip(41), **SHOWS_CAPTCHA))[0] == "CAPTCHA_REQUIRED"
        events = await delivery.ListFraudEvents(delivery_pb2.ListFraudEventsRequest())
        assert [e.value for e in events.events] == ["+491601234", "+491519876"]
        first = await delivery.ListFraudEvents(delivery_pb2.ListFraudEventsRequest(page_size=1))
        after = delivery_pb2.ListFraudEventsRequest(page_size=1, page_token=first.next_page_token)
        second = await delivery.ListFraudEvents(after)
        assert [e.value for e in (*first.events, *second.events)] == [e.value for e in events.events[:2]]
        assert not (await delivery.ListFraudEvents(delivery_pb2.ListFraudEventsRequest(client_id="other"))).events
        after.client_id = "other"
        assert (await refused(delivery.ListFraudEvents(after))).field_violations == [
            ("page_token", "was made for another client_id; start again without it")
        ]

        # An operator's safe list lets the range through at once; a block list stops another.
        await delivery.CreateFraudRule(
            delivery_pb2.CreateFraudRuleRequest(
                rule=common_pb2.FraudRule(
                    prefix="+491519876",
                    action=common_pb2.FRAUD_RULE_ACTION_ALLOW,
                    reason="our call centre",
                    created_by="k1",
                )
            )
        )
        assert (await shop.send("+4915198768765", ip(12)))[0] == "SENT"
        await delivery.CreateFraudRule(
            delivery_pb2.CreateFraudRuleRequest(
                rule=common_pb2.FraudRule(
                    prefix="+4917", action=common_pb2.FRAUD_RULE_ACTION_BLOCK, reason="pumping", client_id="shop"
                )
            )
        )
        reason, metadata, _ = await shop.send("+4917012345678", ip(11), **SOLVED)
        assert (reason, metadata["signal"]) == ("FRAUD_SUSPECTED", "BLOCK_LIST")
        rules = (await delivery.ListFraudRules(delivery_pb2.ListFraudRulesRequest())).rules
        assert {(r.prefix, r.client_id, r.reason) for r in rules} == {
            ("+491519876", "", "our call centre"),
            ("+4917", "shop", "pumping"),
        }
        removal = delivery_pb2.DeleteFraudRuleRequest(prefix="+4917", client_id="shop", actor="k1")
        await delivery.DeleteFraudRule(removal)
        assert (await shop.send("+4917012345678", ip(11), **SOLVED))[0] == "SENT"
        assert (await refused(delivery.DeleteFraudRule(removal))).reason == "FRAUD_RULE_NOT_FOUND"
        # Every change is logged: what, for whom, by which key and why (a prefix long enough to be
        # a number is masked like one).
        logs = [json.loads(line) for line in captured_logs.text().splitlines() if '"fraud_rule_' in line]
        assert [(e["msg"], e.get("action", "-"), e["client_id"], e["by_key_id"]) for e in logs] == [
            ("fraud_rule_set", "allow", "*", "k1"),
            ("fraud_rule_set", "block", "shop", ""),
            ("fraud_rule_removed", "-", "shop", "k1"),
        ]
        assert logs[0]["reason"] == "our call centre" and logs[0]["prefix"] != "+491519876"


async def test_a_requester_asking_for_many_numbers_needs_captchas_then_is_refused(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    async with guard(mongo_client, keyring, clock) as delivery:
        hammer = Client(delivery)
        device = {"user_agent": "python-requests/2.32"}
        first = [
            (await hammer.send(f"+4916{n:02d}1234567", "203.0.113.9", **device, **SHOWS_CAPTCHA))[:2] for n in range(8)
        ]
        assert [reason for reason, _ in first[:2]] == ["SENT", "SENT"]
        asked = [metadata["signal"] for reason, metadata in first if reason == "CAPTCHA_REQUIRED"]
        assert asked and set(asked) <= {"IP_VELOCITY", "NETWORK_VELOCITY", "DEVICE_VELOCITY"}
        # Solving CAPTCHAs does not buy an address an unlimited number of numbers.
        later = [(await hammer.send(f"+4917{n:02d}7654321", "203.0.113.9", **device, **SOLVED))[0] for n in range(12)]
        assert later[-1] == "FRAUD_SUSPECTED" and later.count("SENT") < 12


async def test_a_client_country_whose_codes_nobody_enters_needs_captchas(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    async with guard(mongo_client, keyring, clock) as delivery:
        slow = Client(delivery)
        # A slow spread: a new range and address every two minutes, never a code entered. Nothing
        # stands out at first; once their codes had ten minutes, the unentered ones tell.
        outcomes = []
        for n in range(30):
            outcomes.append((await slow.send(de(20 + n), ip(500 + n), **SHOWS_CAPTCHA))[:2])
            clock.advance(120)
        first = next(i for i, (reason, _) in enumerate(outcomes) if reason != "SENT")
        assert 5 <= first <= 12
        assert {(reason, m["signal"]) for reason, m in outcomes[first:]} == {
            ("CAPTCHA_REQUIRED", "CLIENT_COUNTRY_CONVERSION")
        }
        # Numbers of another country for the same client are not affected.
        assert (await slow.send("+33612345678", ip(998), **SHOWS_CAPTCHA))[0] == "SENT"


async def test_monitor_mode_counts_and_logs_but_lets_through(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock, captured_logs: Any
) -> None:
    async with guard(mongo_client, keyring, clock, OTPGATE_FRAUD_MODE="monitor") as delivery:
        shop = Client(delivery)
        before = (
            REGISTRY.get_sample_value(
                "otpgate_fraud_decisions_total", {"decision": "monitor", "reason": "PREFIX_VELOCITY"}
            )
            or 0.0
        )
        for n in range(4):
            assert (await shop.send(f"+491555555{n * 2500:04d}", ip(n)))[0] == "SENT"
        after = REGISTRY.get_sample_value(
            "otpgate_fraud_decisions_total", {"decision": "monitor", "reason": "PREFIX_VELOCITY"}
        )
        assert after is not None and after >= before + 2
        assert '"decision": "monitor"' in captured_logs.text()
