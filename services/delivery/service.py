"""Thin servicers: DeliveryService and, in sandbox mode, SmsSandboxService."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.protobuf import timestamp_pb2
from otpgate.common.v1 import common_pb2
from otpgate.delivery.v1 import delivery_pb2, delivery_pb2_grpc

from services.core.errors import Violations, invalid_argument, not_found
from services.core.phone import InvalidPhoneError, parse_phone
from services.delivery.engine import Engine
from services.delivery.fraud_rules import check_prefix, event_to_proto, rule_from_proto, rule_to_proto
from services.delivery.sms import SandboxSmsProvider
from services.delivery.store import decode_page_token, encode_page_token

_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
Context = grpc.aio.ServicerContext[Any, Any]


class DeliveryServicer(delivery_pb2_grpc.DeliveryServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def SendMessage(
        self, request: delivery_pb2.SendMessageRequest, context: Context
    ) -> delivery_pb2.SendMessageResponse:
        return await self.engine.send_message(request)

    async def GetMessage(
        self, request: delivery_pb2.GetMessageRequest, context: Context
    ) -> delivery_pb2.GetMessageResponse:
        return delivery_pb2.GetMessageResponse(message=await self.engine.get_message(request.client_id, request.id))

    async def ListMessages(
        self, request: delivery_pb2.ListMessagesRequest, context: Context
    ) -> delivery_pb2.ListMessagesResponse:
        problems = Violations()
        problems.check(bool(request.client_id), "client_id", "is required")
        problems.check(0 <= request.page_size <= 100, "page_size", "must be between 0 and 100")
        after = None
        if request.page_token:
            try:
                after = decode_page_token(request.page_token)
            except (ValueError, TypeError):
                problems.add("page_token", "is not a token from a previous page")
        problems.raise_if_any()
        size = request.page_size or 20
        created_after = (
            request.create_time_after.ToDatetime(tzinfo=UTC) if request.HasField("create_time_after") else None
        )
        created_before = (
            request.create_time_before.ToDatetime(tzinfo=UTC) if request.HasField("create_time_before") else None
        )
        records = await self.engine.store.list_for_client(
            request.client_id, size, after, int(request.status), created_after, created_before
        )
        now = self.engine.clock.now()
        reply = delivery_pb2.ListMessagesResponse(messages=[r.to_proto(now) for r in records[:size]])
        if len(records) > size:
            last = records[size - 1]
            reply.next_page_token = encode_page_token(last.created_at, last.id)
        return reply

    async def CancelMessage(
        self, request: delivery_pb2.CancelMessageRequest, context: Context
    ) -> delivery_pb2.CancelMessageResponse:
        return delivery_pb2.CancelMessageResponse(
            message=await self.engine.cancel_message(request.client_id, request.id)
        )

    async def ReleaseHeldMessages(
        self, request: delivery_pb2.ReleaseHeldMessagesRequest, context: Context
    ) -> delivery_pb2.ReleaseHeldMessagesResponse:
        if request.telegram_user_id <= 0:
            raise invalid_argument([("telegram_user_id", "is required")])
        released = await self.engine.release_held(request.telegram_user_id, request.phone)
        return delivery_pb2.ReleaseHeldMessagesResponse(released_count=released)

    async def FailHeldMessages(
        self, request: delivery_pb2.FailHeldMessagesRequest, context: Context
    ) -> delivery_pb2.FailHeldMessagesResponse:
        if request.telegram_user_id <= 0:
            raise invalid_argument([("telegram_user_id", "is required")])
        failed = await self.engine.fail_held(request.telegram_user_id, request.phone)
        return delivery_pb2.FailHeldMessagesResponse(failed_count=failed)

    async def CheckReachability(
        self, request: delivery_pb2.CheckReachabilityRequest, context: Context
    ) -> delivery_pb2.CheckReachabilityResponse:
        return await self.engine.check_reachability(request)

    async def GetClientPolicy(
        self, request: delivery_pb2.GetClientPolicyRequest, context: Context
    ) -> delivery_pb2.GetClientPolicyResponse:
        if not request.client_id:
            raise invalid_argument([("client_id", "is required")])
        policy = await self.engine.policies.get(request.client_id)
        return delivery_pb2.GetClientPolicyResponse(policy=self.engine.policies.to_proto(policy))

    async def UpdateClientPolicy(
        self, request: delivery_pb2.UpdateClientPolicyRequest, context: Context
    ) -> delivery_pb2.UpdateClientPolicyResponse:
        if not request.policy.client_id:
            raise invalid_argument([("policy.client_id", "is required")])
        policy = await self.engine.policies.update(request.policy, request.update_mask, self.engine.keyring)
        return delivery_pb2.UpdateClientPolicyResponse(policy=self.engine.policies.to_proto(policy))

    async def RecordConversion(
        self, request: delivery_pb2.RecordConversionRequest, context: Context
    ) -> delivery_pb2.RecordConversionResponse:
        await self.engine.record_conversion(request.client_id, request.message_id)
        return delivery_pb2.RecordConversionResponse()

    async def ListFraudEvents(
        self, request: delivery_pb2.ListFraudEventsRequest, context: Context
    ) -> delivery_pb2.ListFraudEventsResponse:
        problems = Violations()
        problems.check(0 <= request.page_size <= 500, "page_size", "must be between 0 and 500")
        problems.raise_if_any()
        try:
            events, next_token = await self.engine.fraud.events.page(
                request.client_id, request.page_size or 100, request.page_token
            )
        except ValueError as exc:
            raise invalid_argument([("page_token", str(exc))]) from None
        return delivery_pb2.ListFraudEventsResponse(
            events=[event_to_proto(event) for event in events], next_page_token=next_token
        )

    async def ListFraudRules(
        self, request: delivery_pb2.ListFraudRulesRequest, context: Context
    ) -> delivery_pb2.ListFraudRulesResponse:
        rules = await self.engine.fraud.rules.list()
        return delivery_pb2.ListFraudRulesResponse(rules=[rule_to_proto(rule) for rule in rules])

    async def CreateFraudRule(
        self, request: delivery_pb2.CreateFraudRuleRequest, context: Context
    ) -> delivery_pb2.CreateFraudRuleResponse:
        rule = await self.engine.fraud.rules.put(rule_from_proto(request.rule))
        return delivery_pb2.CreateFraudRuleResponse(rule=rule_to_proto(rule))

    async def DeleteFraudRule(
        self, request: delivery_pb2.DeleteFraudRuleRequest, context: Context
    ) -> delivery_pb2.DeleteFraudRuleResponse:
        problems = Violations()
        check_prefix(problems, "prefix", request.prefix)
        problems.raise_if_any()
        removed = await self.engine.fraud.rules.delete(request.prefix, request.client_id, request.actor)
        if removed is None:
            raise not_found("fraud rule", "FRAUD_RULE_NOT_FOUND")
        return delivery_pb2.DeleteFraudRuleResponse(rule=rule_to_proto(removed))

    async def GetUsage(self, request: delivery_pb2.GetUsageRequest, context: Context) -> delivery_pb2.GetUsageResponse:
        problems = Violations()
        problems.check(bool(request.client_id), "client_id", "is required")
        today = self.engine.clock.now().strftime("%Y-%m-%d")
        start = request.start_day or (self.engine.clock.now() - timedelta(days=30)).strftime("%Y-%m-%d")
        end = request.end_day or today
        for name, value in (("start_day", start), ("end_day", end)):
            if not _DAY.match(value):
                problems.add(name, "must be YYYY-MM-DD")
            else:
                try:
                    datetime.strptime(value, "%Y-%m-%d")
                except ValueError:
                    problems.add(name, "is not a calendar day")
        problems.raise_if_any()
        if start > end:
            raise invalid_argument([("end_day", "must not be before start_day")])
        rows = await self.engine.store.usage_between(request.client_id, start, end)
        records = [
            delivery_pb2.UsageRecord(
                day=row.day,
                channel=common_pb2.Channel.ValueType(row.channel),
                messages=row.messages,
                billed_sms=row.billed_sms,
                sms_parts=row.sms_parts,
                cost=row.cost_micros / 1_000_000,
                refunded=row.refunded,
            )
            for row in rows
        ]
        return delivery_pb2.GetUsageResponse(records=records)

    async def ApplyGatewayReport(
        self, request: delivery_pb2.ApplyGatewayReportRequest, context: Context
    ) -> delivery_pb2.ApplyGatewayReportResponse:
        problems = Violations()
        problems.check(0 < len(request.body) <= 16384, "body", "must be 1 to 16384 bytes")
        problems.check(len(request.timestamp) <= 20, "timestamp", "must be a Unix time")
        problems.check(len(request.signature) <= 128, "signature", "must be a hex HMAC-SHA256")
        problems.raise_if_any()
        await self.engine.apply_gateway_report(request.body, request.timestamp, request.signature)
        return delivery_pb2.ApplyGatewayReportResponse()

    async def CheckGatewayCode(
        self, request: delivery_pb2.CheckGatewayCodeRequest, context: Context
    ) -> delivery_pb2.CheckGatewayCodeResponse:
        problems = Violations()
        problems.check(bool(request.client_id), "client_id", "is required")
        problems.check(bool(request.message_id), "message_id", "is required")
        problems.check(request.code.isdigit() and 4 <= len(request.code) <= 8, "code", "must be 4 to 8 digits")
        problems.raise_if_any()
        status = await self.engine.check_gateway_code(request.client_id, request.message_id, request.code)
        return delivery_pb2.CheckGatewayCodeResponse(valid=status == "code_valid", status=status)


class SmsSandboxServicer(delivery_pb2_grpc.SmsSandboxServiceServicer):
    def __init__(self, provider: SandboxSmsProvider) -> None:
        self.provider = provider

    async def ListSandboxSms(
        self, request: delivery_pb2.ListSandboxSmsRequest, context: Context
    ) -> delivery_pb2.ListSandboxSmsResponse:
        problems = Violations()
        problems.check(0 <= request.page_size <= 100, "page_size", "must be between 0 and 100")
        e164 = ""
        try:
            e164 = parse_phone(request.phone).e164
        except InvalidPhoneError as exc:
            problems.add("phone", str(exc))
        problems.raise_if_any()
        docs = await self.provider.inbox(e164, request.page_size or 20)
        out = []
        for doc in docs:
            stamp = timestamp_pb2.Timestamp()
            stamp.FromDatetime(doc["at"])
            out.append(
                delivery_pb2.SandboxSms(
                    id=str(doc["_id"]),
                    phone_masked=doc["phone_masked"],
                    text=doc["text"],
                    sender=doc.get("sender", ""),
                    create_time=stamp,
                )
            )
        return delivery_pb2.ListSandboxSmsResponse(messages=out)


_ = not_found
