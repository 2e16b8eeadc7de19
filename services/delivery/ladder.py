"""The ladder: which channels a message may go out on, in order, and what lets it climb.

A message asked for one channel (TELEGRAM, TELEGRAM_GATEWAY, SMS) has a ladder of that rung alone.
CHANNEL_AUTO uses the client's policy ladder (e.g. bot -> Gateway -> SMS), else a bot and, with
sms_fallback, SMS. The Gateway rung needs a code (it sends codes, not texts) and a token; an SMS
rung needs sms_fallback (the request's, else the policy's). A rung that does not serve the number's
country is passed over.

The message keeps the rung it is on (`rung`); dispatch.py climbs only when the rung failed for
good: no bot will take it, the Gateway or SMS admission refused it, its daily cap is reached, the
Gateway said the number cannot be reached, or its check got no answer (nothing reached the person).
An outcome that is not known (a bot or Gateway send without an answer, a temporary SMS error)
keeps the message on its rung for the next try, so a code never goes out over two channels for
one message. The one timeout: a Gateway rung's `fallback_after` (dispatch.py `_fall_back`) revokes
a code still undelivered and climbs only once the Gateway says it is revoked, never delivered. A rung's daily cap is counted once per message, when the message first reaches it
(`caps_taken`).
"""

from __future__ import annotations

from services.delivery.policy import Policy, Rung
from services.delivery.record import AUTO, GATEWAY, SMS, TELEGRAM, MessageRecord


def rungs(record: MessageRecord, policy: Policy, gateway_usable: bool) -> tuple[Rung, ...]:
    if record.requested_channel != AUTO:
        return (Rung(record.requested_channel),)
    ladder = policy.ladder or (Rung(TELEGRAM), Rung(SMS))
    usable = []
    for rung in ladder:
        if rung.channel == SMS and not record.sms_fallback:
            continue
        if rung.channel == GATEWAY and not ((record.code_sealed or record.gateway_code_length) and gateway_usable):
            continue
        usable.append(rung)
    return tuple(usable)


_CAP_NAMES: dict[int, str] = {TELEGRAM: "daily_cap_telegram", GATEWAY: "daily_cap_gateway", SMS: "daily_cap_sms"}


def cap_name(channel: int) -> str:
    return _CAP_NAMES[channel]
