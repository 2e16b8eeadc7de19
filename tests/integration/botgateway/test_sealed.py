"""Bot tokens and sessions are sealed, declared for key rotation, and still open after it."""

from __future__ import annotations

from pymongo.asynchronous.database import AsyncDatabase

from services.botgateway.store import GatewayStore
from services.core.clock import ManualClock
from services.core.crypto import Keyring
from services.core.mongo import Document
from services.core.rotation_runner import CollectionRotation, load_declarations, plan_collections


async def test_rotation_reseals_tokens_and_sessions(
    database: AsyncDatabase[Document], keyring: Keyring, clock: ManualClock
) -> None:
    old = Keyring(keyring._roots, primary_id="k1")  # test-only: seal with the older key first
    store = GatewayStore(database, old)
    await store.create_indexes()
    await store.insert_bot(
        bot_id="acme_bot",
        username="Acme_Bot",
        telegram_id=6000,
        shared=False,
        owner_client_id="c",
        source="api",
        token="6000:secret-token",
        session="1AbCsession",
        now=clock.now(),
    )
    (declarations,) = load_declarations(["botgateway"])
    plan = plan_collections(declarations)
    assert set(plan) == {"bots"} and set(plan["bots"][0]) == {"token_sealed", "session_sealed"}
    result = await CollectionRotation(database, "bots", keyring, sealed_fields=plan["bots"][0]).run()
    assert result.finished
    raw = await database["bots"].find_one({"_id": "acme_bot"})
    assert raw is not None
    assert keyring.key_id_of(raw["token_sealed"]) == "k2" and keyring.key_id_of(raw["session_sealed"]) == "k2"
    bot = await GatewayStore(database, keyring).get_bot("acme_bot")
    assert bot is not None and (bot.token, bot.session) == ("6000:secret-token", "1AbCsession")
