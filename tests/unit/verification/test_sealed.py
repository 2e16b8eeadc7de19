"""Sealed fields are declared so `otpgate keys rotate` re-encrypts them, and still open after it."""

from __future__ import annotations

from services.core.crypto import Keyring
from services.core.rotation_runner import CollectionRotation, load_declarations, plan_collections
from services.verification.confirm import Confirmer
from services.verification.verify import Verifier
from tests.unit.verification.conftest import start_request


async def test_key_rotation_reseals_pending_codes_and_phones(verifier: Verifier, confirmer: Confirmer) -> None:
    k1_only = Keyring(verifier.keyring._roots, primary_id="k1")  # test-only: seal with the older key first
    verifier.engine.keyring = k1_only
    issued = await verifier.issue(verifier.validate_start(start_request()))
    assert issued is not None
    record, code = issued
    assert verifier.keyring.key_id_of(record["code"]) == "k1"

    (declarations,) = load_declarations(["verification"])
    plan = plan_collections(declarations)
    assert set(plan) == {"verifications", "confirmations"}
    for collection, (fields, indexes) in plan.items():
        assert set(fields) == {"code", "phone"}
        result = await CollectionRotation(
            verifier.store.database, collection, verifier.keyring, sealed_fields=fields, blind_indexes=indexes
        ).run()
        assert result.finished

    verifier.engine.keyring = verifier.keyring
    stored = await verifier.store.verifications.find_one({"_id": record["_id"]})
    assert verifier.keyring.key_id_of(stored["code"]) == "k2"
    assert verifier.engine.open_code(stored) == code
    assert verifier.engine.open_phone(stored) == "+79991234567"
