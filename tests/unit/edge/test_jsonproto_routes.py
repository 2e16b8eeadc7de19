"""Routing from the google.api.http annotations and proto3 JSON with field violations."""

from __future__ import annotations

import grpc
import pytest
from otpgate.edge.v1 import edge_pb2
from otpgate.telegramsim.v1 import telegramsim_pb2

from services.core.errors import ServiceError, Violations
from services.edge.jsonproto import parse_message, put_path_values, query_to_json, to_json
from services.edge.routes import compile_template, rules_for

PUBLIC = edge_pb2.DESCRIPTOR.services_by_name["PublicService"]
ADMIN = edge_pb2.DESCRIPTOR.services_by_name["AdminService"]


def test_routes_come_from_the_annotations() -> None:
    table = {(r.verb, r.template): r.method.name for r in rules_for(PUBLIC)}
    assert table == {
        ("POST", "/v1/messages"): "SendMessage",
        ("GET", "/v1/messages/{id}"): "GetMessage",
        ("GET", "/v1/messages"): "ListMessages",
        ("POST", "/v1/messages/{id}:cancel"): "CancelMessage",
        ("POST", "/v1/reachability:check"): "CheckReachability",
        ("POST", "/v1/verifications"): "StartVerification",
        ("GET", "/v1/verifications/{id}"): "GetVerification",
        ("POST", "/v1/verifications/{id}:check"): "CheckVerification",
        ("POST", "/v1/verifications/{id}:cancel"): "CancelVerification",
        ("GET", "/v1/verifications"): "ListVerifications",
        ("GET", "/v1/bots"): "ListBots",
        ("GET", "/v1/usage"): "GetUsage",
        ("GET", "/v1/apiKeys/current"): "GetCurrentApiKey",
    }
    admin = {(r.verb, r.template): r.method.name for r in rules_for(ADMIN)}
    assert admin == {
        ("POST", "/v1/clients"): "CreateClient",
        ("GET", "/v1/clients/{id}"): "GetClient",
        ("GET", "/v1/clients"): "ListClients",
        ("POST", "/v1/clients/{client_id}/apiKeys"): "CreateApiKey",
        ("GET", "/v1/clients/{client_id}/apiKeys"): "ListApiKeys",
        ("POST", "/v1/apiKeys/{id}:revoke"): "RevokeApiKey",
        ("GET", "/v1/clients/{client_id}/usage"): "GetClientUsage",
        ("GET", "/v1/clients/{client_id}/policy"): "GetClientPolicy",
        ("PATCH", "/v1/clients/{policy.client_id}/policy"): "UpdateClientPolicy",
        ("POST", "/v1/bots"): "RegisterBot",
        ("GET", "/v1/clients/{owner_client_id}/bots"): "ListAllBots",
        ("DELETE", "/v1/bots/{bot_id}"): "RemoveBot",
        ("GET", "/v1/fraudEvents"): "ListFraudEvents",
        ("GET", "/v1/fraudRules"): "ListFraudRules",
        ("POST", "/v1/fraudRules"): "CreateFraudRule",
        ("DELETE", "/v1/fraudRules/{prefix}"): "DeleteFraudRule",
    }
    # Every method of both services is reachable over HTTP.
    for service in (PUBLIC, ADMIN):
        assert {m.name for m in service.methods} == {r.method.name for r in rules_for(service)}


def test_a_field_mask_in_the_query_takes_either_spelling() -> None:
    descriptor = edge_pb2.UpdateClientPolicyRequest.DESCRIPTOR
    for given in ("daily_sms_cap,rate_limits.phone_daily", "dailySmsCap, rateLimits.phoneDaily"):
        problems = Violations()
        data = query_to_json(descriptor, [("updateMask", given)], problems)
        message = parse_message(edge_pb2.UpdateClientPolicyRequest, data, problems)
        assert list(message.update_mask.paths) == ["daily_sms_cap", "rate_limits.phone_daily"]


def test_a_patch_body_is_the_resource_and_its_name_comes_from_the_path() -> None:
    rule = next(r for r in rules_for(ADMIN) if r.method.name == "UpdateClientPolicy")
    values = rule.match("/v1/clients/01CLIENT/policy")
    assert values == {"policy.client_id": "01CLIENT"}
    data = {"policy": {"dailySmsCap": 5, "clientId": "someone-else"}, "updateMask": "dailySmsCap"}
    put_path_values(rule.method.input_type, data, values)
    message = parse_message(edge_pb2.UpdateClientPolicyRequest, data)
    assert message.policy.client_id == "01CLIENT"
    assert message.policy.daily_sms_cap == 5
    assert list(message.update_mask.paths) == ["daily_sms_cap"]


def test_template_matching() -> None:
    cancel = next(r for r in rules_for(PUBLIC) if r.method.name == "CancelMessage")
    assert cancel.match("/v1/messages/01ABC:cancel") == {"id": "01ABC"}
    assert cancel.match("/v1/messages/a%3Ab:cancel") == {"id": "a:b"}
    assert cancel.match("/v1/messages/01ABC") is None
    assert cancel.match("/v1/messages/a/b:cancel") is None
    sandbox = rules_for(telegramsim_pb2.DESCRIPTOR.services_by_name["SandboxService"])
    start = next(r for r in sandbox if r.method.name == "StartBot")
    assert start.match("/sandbox/v1/users/42/bots/smscodes_bot:start") == {"user_id": "42", "bot_id": "smscodes_bot"}
    pattern, variables = compile_template("/v1/{name=projects/*/things/*}/x/**:run")
    found = pattern.match("/v1/projects/p/things/t/x/a/b:run")
    assert found is not None and found.group(variables[0][0]) == "projects/p/things/t"


def _violations(cls: type, data: object) -> list[tuple[str, str]]:
    with pytest.raises(ServiceError) as caught:
        parse_message(cls, data)  # type: ignore[type-var]
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    bad = caught.value.details[0]
    return [(v.field, v.description) for v in bad.field_violations]  # type: ignore[attr-defined]


def test_parse_accepts_proto3_json() -> None:
    message = parse_message(
        edge_pb2.SendMessageRequest,
        {
            "phone": "+4915112345678",
            "text": "hi",
            "channel": "CHANNEL_SMS",
            "confirmDays": 0,
            "ttl": "60s",
            "sms_fallback": False,
        },
    )
    assert message.channel == 3 and message.HasField("confirm_days") and message.ttl.seconds == 60
    assert message.HasField("sms_fallback") and not message.sms_fallback
    assert to_json(edge_pb2.CheckVerificationResponse())["approved"] is False


def test_wrong_types_name_every_field() -> None:
    found = _violations(
        edge_pb2.SendMessageRequest,
        {
            "phone": 79991234567,
            "channel": "PIGEON",
            "confirmDays": "soon",
            "ttl": 30,
            "protectContent": "yes",
            "deleteAfter": "tomorrow",
            "extra": 1,
        },
    )
    fields = [f for f, _ in found]
    assert fields == ["phone", "channel", "confirm_days", "ttl", "protect_content", "delete_after", "extra"]
    assert _violations(edge_pb2.ListMessagesRequest, {"page_size": 2**40}) == [
        ("page_size", "must be between -2147483648 and 2147483647")
    ]
    assert _violations(edge_pb2.SendMessageRequest, ["not", "an", "object"]) == [("body", "must be a JSON object")]


def test_query_parameters() -> None:
    problems = Violations()
    data = query_to_json(
        edge_pb2.ListMessagesRequest.DESCRIPTOR,
        [("pageSize", "5"), ("status", "MESSAGE_STATUS_SENT"), ("create_time_after", "2026-01-01T00:00:00Z")],
        problems,
    )
    assert not problems
    message = parse_message(edge_pb2.ListMessagesRequest, data)
    assert message.page_size == 5 and message.status == 3 and message.create_time_after.seconds > 0
    query_to_json(edge_pb2.ListMessagesRequest.DESCRIPTOR, [("nope", "1"), ("pageSize.x", "1")], problems)
    assert [f for f, _ in problems.items] == ["nope", "page_size"]


def test_path_values_override_the_body() -> None:
    data = {"userId": "7", "text": "hi"}
    put_path_values(telegramsim_pb2.SendTextRequest.DESCRIPTOR, data, {"user_id": "42", "bot_id": "b"})
    message = parse_message(telegramsim_pb2.SendTextRequest, data)
    assert (message.user_id, message.bot_id, message.text) == (42, "b", "hi")
    bad = {}
    put_path_values(telegramsim_pb2.SendTextRequest.DESCRIPTOR, bad, {"user_id": "abc", "bot_id": "b"})
    assert _violations(telegramsim_pb2.SendTextRequest, bad) == [("user_id", "must be an integer")]
