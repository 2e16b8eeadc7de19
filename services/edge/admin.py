"""The operator's side: clients, API keys, policies and bots (AdminService over gRPC and HTTP,
and `otpgate clients/apikeys`). Every AdminService call needs an admin-scope key."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from otpgate.botgateway.v1 import botgateway_pb2
from otpgate.delivery.v1 import delivery_pb2
from otpgate.edge.v1 import edge_pb2

from services.core import page_tokens
from services.core.clock import Clock
from services.core.crypto import Keyring
from services.core.errors import Violations, already_exists, invalid_argument, not_found
from services.core.ids import new_id
from services.edge.downstream import Caller, forward
from services.edge.keys import ENUM_TO_SCOPE, SCOPE_TO_ENUM, Principal, hash_secret, new_key, normalize_scopes
from services.edge.store import ApiKeyRecord, ClientRecord, EdgeStore

if TYPE_CHECKING:
    from services.edge.api import PublicApi

MAX_NAME_LENGTH = 100
ALL_OWNERS = "-"  # AIP-159: ListAllBots across every owner


def _timestamp(moment: datetime | None) -> Timestamp | None:
    if moment is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def client_message(record: ClientRecord) -> edge_pb2.Client:
    return edge_pb2.Client(id=record.id, display_name=record.display_name, create_time=_timestamp(record.created_at))


def api_key_message(record: ApiKeyRecord) -> edge_pb2.ApiKey:
    return edge_pb2.ApiKey(
        id=record.id,
        client_id=record.client_id,
        scopes=[SCOPE_TO_ENUM[s] for s in record.scopes if s in SCOPE_TO_ENUM],
        create_time=_timestamp(record.created_at),
        last_use_time=_timestamp(record.last_used_at),
        revoke_time=_timestamp(record.revoked_at),
    )


def page_token(last_id: str) -> str:
    return page_tokens.encode(last_id)


def after_id(token: str) -> str:
    if not token:
        return ""
    try:
        return page_tokens.decode(token)
    except ValueError:
        raise invalid_argument([("page_token", "is not a token from a previous page")]) from None


def page_size(value: int, default: int = 50, maximum: int = 100) -> int:
    if not 0 <= value <= maximum:
        raise invalid_argument([("page_size", f"must be between 0 and {maximum}")])
    return value or default


def _required(**fields: str) -> None:
    problems = Violations()
    for name, value in fields.items():
        problems.check(bool(value.strip()), name, "required")
    problems.raise_if_any()


class ClientAdmin:
    def __init__(self, store: EdgeStore, keyring: Keyring, clock: Clock) -> None:
        self.store = store
        self._keyring = keyring
        self._clock = clock

    async def create_client(self, display_name: str) -> ClientRecord:
        name = display_name.strip()
        problems = Violations()
        problems.check(bool(name), "display_name", "must not be empty")
        problems.check(len(name) <= MAX_NAME_LENGTH, "display_name", f"at most {MAX_NAME_LENGTH} characters")
        problems.check(name.isprintable(), "display_name", "must be printable text")
        problems.raise_if_any()
        now = self._clock.now()
        created = await self.store.insert_client(new_id(int(now.timestamp() * 1000)), name, now)
        if created is None:
            raise already_exists("a client with this name exists", "CLIENT_EXISTS")
        return created

    async def client(self, client_id_or_name: str) -> ClientRecord:
        found = await self.store.get_client(client_id_or_name) if client_id_or_name else None
        if found is None and client_id_or_name:
            found = await self.store.find_client_by_name(client_id_or_name)
        if found is None:
            raise not_found("client", "CLIENT_NOT_FOUND")
        return found

    async def create_key(self, client_id: str, scopes: list[str]) -> tuple[ApiKeyRecord, str]:
        """The stored key and the full key (shown once)."""
        try:
            chosen = normalize_scopes(scopes)
        except ValueError as exc:
            raise invalid_argument([("scopes", str(exc))]) from None
        client = await self.client(client_id)
        key_id, secret, full = new_key()
        record = await self.store.insert_key(
            key_id, client.id, chosen, hash_secret(self._keyring, key_id, secret), self._clock.now()
        )
        return record, full

    async def list_keys(self, client_id: str) -> list[ApiKeyRecord]:
        client = await self.client(client_id)
        return await self.store.list_keys(client.id)

    async def revoke_key(self, key_id: str) -> ApiKeyRecord:
        record = await self.store.revoke_key(key_id, self._clock.now()) if key_id else None
        if record is None:
            raise not_found("API key", "API_KEY_NOT_FOUND")
        return record


Handler = Callable[["Principal", "Caller", Any], Awaitable[Message]]


class AdminApi:
    """AdminService's behaviour, shared by the gRPC servicer and the HTTP/JSON gateway (the
    caller is admitted with an admin-scope key first, as PublicApi admits public calls)."""

    def __init__(self, api: PublicApi, admin: ClientAdmin) -> None:
        self._api = api
        self.admin = admin
        self.handlers: dict[str, Handler] = {
            "CreateClient": self.create_client,
            "GetClient": self.get_client,
            "ListClients": self.list_clients,
            "CreateApiKey": self.create_api_key,
            "ListApiKeys": self.list_api_keys,
            "RevokeApiKey": self.revoke_api_key,
            "GetClientUsage": self.get_client_usage,
            "GetClientPolicy": self.get_client_policy,
            "UpdateClientPolicy": self.update_client_policy,
            "RegisterBot": self.register_bot,
            "ListAllBots": self.list_all_bots,
            "RemoveBot": self.remove_bot,
            "ListFraudEvents": self.list_fraud_events,
            "ListFraudRules": self.list_fraud_rules,
            "CreateFraudRule": self.create_fraud_rule,
            "DeleteFraudRule": self.delete_fraud_rule,
        }

    async def create_client(
        self, principal: Principal, caller: Caller, request: edge_pb2.CreateClientRequest
    ) -> edge_pb2.CreateClientResponse:
        record = await self.admin.create_client(request.display_name)
        return edge_pb2.CreateClientResponse(client=client_message(record))

    async def get_client(
        self, principal: Principal, caller: Caller, request: edge_pb2.GetClientRequest
    ) -> edge_pb2.GetClientResponse:
        _required(id=request.id)
        return edge_pb2.GetClientResponse(client=client_message(await self.admin.client(request.id)))

    async def list_clients(
        self, principal: Principal, caller: Caller, request: edge_pb2.ListClientsRequest
    ) -> edge_pb2.ListClientsResponse:
        size = page_size(request.page_size)
        records = await self.admin.store.list_clients(after_id(request.page_token), size + 1)
        more = len(records) > size
        records = records[:size]
        return edge_pb2.ListClientsResponse(
            clients=[client_message(r) for r in records],
            next_page_token=page_token(records[-1].id) if more and records else "",
        )

    async def create_api_key(
        self, principal: Principal, caller: Caller, request: edge_pb2.CreateApiKeyRequest
    ) -> edge_pb2.CreateApiKeyResponse:
        problems = Violations()
        problems.check(bool(request.client_id.strip()), "client_id", "required")
        for index, scope in enumerate(request.scopes):
            problems.check(scope in ENUM_TO_SCOPE, f"scopes[{index}]", "unknown scope")
        problems.raise_if_any()
        record, key = await self.admin.create_key(request.client_id, [ENUM_TO_SCOPE[s] for s in request.scopes])
        return edge_pb2.CreateApiKeyResponse(api_key=api_key_message(record), key=key)

    async def list_api_keys(
        self, principal: Principal, caller: Caller, request: edge_pb2.ListApiKeysRequest
    ) -> edge_pb2.ListApiKeysResponse:
        _required(client_id=request.client_id)
        return edge_pb2.ListApiKeysResponse(
            api_keys=[api_key_message(r) for r in await self.admin.list_keys(request.client_id)]
        )

    async def revoke_api_key(
        self, principal: Principal, caller: Caller, request: edge_pb2.RevokeApiKeyRequest
    ) -> edge_pb2.RevokeApiKeyResponse:
        _required(id=request.id)
        record = await self.admin.revoke_key(request.id)
        self._api.auth.forget(record.id)
        return edge_pb2.RevokeApiKeyResponse(api_key=api_key_message(record))

    async def get_client_usage(
        self, principal: Principal, caller: Caller, request: edge_pb2.GetClientUsageRequest
    ) -> edge_pb2.GetClientUsageResponse:
        _required(client_id=request.client_id)
        client = await self.admin.client(request.client_id)
        usage = await self._api.usage_of(client.id, request.start_day, request.end_day, caller.timeout)
        return edge_pb2.GetClientUsageResponse(records=usage.records)

    async def get_client_policy(
        self, principal: Principal, caller: Caller, request: edge_pb2.GetClientPolicyRequest
    ) -> edge_pb2.GetClientPolicyResponse:
        _required(client_id=request.client_id)
        client = await self.admin.client(request.client_id)
        reply = await _forward(
            self._api.delivery.GetClientPolicy, delivery_pb2.GetClientPolicyRequest(client_id=client.id), caller
        )
        return edge_pb2.GetClientPolicyResponse(policy=reply.policy)

    async def update_client_policy(
        self, principal: Principal, caller: Caller, request: edge_pb2.UpdateClientPolicyRequest
    ) -> edge_pb2.UpdateClientPolicyResponse:
        problems = Violations()
        problems.check(bool(request.policy.client_id.strip()), "policy.client_id", "required")
        problems.raise_if_any()
        client = await self.admin.client(request.policy.client_id)
        policy = type(request.policy)()
        policy.CopyFrom(request.policy)
        policy.client_id = client.id
        reply = await _forward(
            self._api.delivery.UpdateClientPolicy,
            delivery_pb2.UpdateClientPolicyRequest(policy=policy, update_mask=request.update_mask),
            caller,
        )
        self._api.policies.forget(client.id)
        return edge_pb2.UpdateClientPolicyResponse(policy=reply.policy)

    async def register_bot(
        self, principal: Principal, caller: Caller, request: edge_pb2.RegisterBotRequest
    ) -> edge_pb2.RegisterBotResponse:
        _required(token=request.token)
        owner = (await self.admin.client(request.owner_client_id)).id if request.owner_client_id else ""
        reply = await _forward(
            self._api.botgateway.RegisterBot,
            botgateway_pb2.RegisterBotRequest(token=request.token, owner_client_id=owner, shared=request.shared),
            caller,
        )
        return edge_pb2.RegisterBotResponse(bot=reply.bot)

    async def list_all_bots(
        self, principal: Principal, caller: Caller, request: edge_pb2.ListAllBotsRequest
    ) -> edge_pb2.ListAllBotsResponse:
        owner = "" if request.owner_client_id == ALL_OWNERS else request.owner_client_id
        if owner:
            owner = (await self.admin.client(owner)).id
        reply = await _forward(
            self._api.botgateway.ListBots,
            botgateway_pb2.ListBotsRequest(
                owner_client_id=owner, page_size=request.page_size, page_token=request.page_token
            ),
            caller,
        )
        return edge_pb2.ListAllBotsResponse(bots=reply.bots, next_page_token=reply.next_page_token)

    async def remove_bot(
        self, principal: Principal, caller: Caller, request: edge_pb2.RemoveBotRequest
    ) -> edge_pb2.RemoveBotResponse:
        _required(bot_id=request.bot_id)
        bot = await _forward(self._api.botgateway.GetBot, botgateway_pb2.GetBotRequest(bot_id=request.bot_id), caller)
        await _forward(
            self._api.botgateway.RemoveBot,
            botgateway_pb2.RemoveBotRequest(bot_id=request.bot_id, owner_client_id=bot.bot.owner_client_id),
            caller,
        )
        return edge_pb2.RemoveBotResponse()

    # The fraud guard (delivery): its events and the operators' prefix rules --------------------

    async def list_fraud_events(
        self, principal: Principal, caller: Caller, request: edge_pb2.ListFraudEventsRequest
    ) -> edge_pb2.ListFraudEventsResponse:
        client = (await self.admin.client(request.client_id)).id if request.client_id else ""
        reply = await _forward(
            self._api.delivery.ListFraudEvents,
            delivery_pb2.ListFraudEventsRequest(
                client_id=client, page_size=request.page_size, page_token=request.page_token
            ),
            caller,
        )
        return edge_pb2.ListFraudEventsResponse(events=reply.events, next_page_token=reply.next_page_token)

    async def list_fraud_rules(
        self, principal: Principal, caller: Caller, request: edge_pb2.ListFraudRulesRequest
    ) -> edge_pb2.ListFraudRulesResponse:
        reply = await _forward(self._api.delivery.ListFraudRules, delivery_pb2.ListFraudRulesRequest(), caller)
        return edge_pb2.ListFraudRulesResponse(rules=reply.rules)

    async def create_fraud_rule(
        self, principal: Principal, caller: Caller, request: edge_pb2.CreateFraudRuleRequest
    ) -> edge_pb2.CreateFraudRuleResponse:
        rule = type(request.rule)()
        rule.CopyFrom(request.rule)
        rule.client_id = (await self.admin.client(rule.client_id)).id if rule.client_id else ""
        rule.created_by = principal.key_id  # the audit trail names the key, never a caller's say-so
        rule.ClearField("create_time")
        reply = await _forward(
            self._api.delivery.CreateFraudRule, delivery_pb2.CreateFraudRuleRequest(rule=rule), caller
        )
        return edge_pb2.CreateFraudRuleResponse(rule=reply.rule)

    async def delete_fraud_rule(
        self, principal: Principal, caller: Caller, request: edge_pb2.DeleteFraudRuleRequest
    ) -> edge_pb2.DeleteFraudRuleResponse:
        client = (await self.admin.client(request.client_id)).id if request.client_id else ""
        reply = await _forward(
            self._api.delivery.DeleteFraudRule,
            delivery_pb2.DeleteFraudRuleRequest(prefix=request.prefix, client_id=client, actor=principal.key_id),
            caller,
        )
        return edge_pb2.DeleteFraudRuleResponse(rule=reply.rule)


async def _forward(call: Callable[..., Awaitable[Any]], request: Message, caller: Caller) -> Any:
    return await forward(call, request, caller.timeout)
