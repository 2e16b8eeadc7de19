from __future__ import annotations

import pytest

from services.core.crypto import CryptoError, DecryptionError, Keyring, SealContext, UnknownKeyError

CTX = SealContext("subscribers", "doc-1", "phone")


def test_seal_round_trip_binds_key_id_and_hides_plaintext(keyring: Keyring) -> None:
    sealed = keyring.seal("+79991234567", CTX)
    assert b"79991234567" not in sealed
    assert keyring.key_id_of(sealed) == "k2"
    assert keyring.open_str(sealed, CTX) == "+79991234567"
    assert keyring.seal("+79991234567", CTX) != sealed  # random nonce


@pytest.mark.parametrize("position", [-1, -17, 10])
def test_tampered_ciphertext_fails(keyring: Keyring, position: int) -> None:
    sealed = bytearray(keyring.seal("secret", CTX))
    sealed[position] ^= 0x01
    with pytest.raises(DecryptionError):
        keyring.open(bytes(sealed), CTX)


@pytest.mark.parametrize(
    "other",
    [
        SealContext("subscribers", "doc-2", "phone"),
        SealContext("subscribers", "doc-1", "token"),
        SealContext("messages", "doc-1", "phone"),
    ],
)
def test_wrong_associated_data_fails(keyring: Keyring, other: SealContext) -> None:
    sealed = keyring.seal("secret", CTX)
    with pytest.raises(DecryptionError):
        keyring.open(sealed, other)


def test_relabelled_key_id_fails(keyring: Keyring) -> None:
    sealed = keyring.seal("secret", CTX)
    relabelled = sealed.replace(b"k2", b"k1", 1)
    with pytest.raises(DecryptionError):
        keyring.open(relabelled, CTX)


def test_unknown_key_id(keyring: Keyring) -> None:
    other = Keyring.parse(Keyring.generate_spec("k9"))
    sealed = other.seal("secret", CTX)
    with pytest.raises(UnknownKeyError):
        keyring.open(sealed, CTX)


def test_old_keys_keep_opening_after_rotation(keyring: Keyring) -> None:
    old = Keyring({"k1": keyring._roots["k1"]}, "k1")
    sealed = old.seal("secret", CTX)
    assert keyring.needs_rotation(sealed)
    resealed = keyring.reseal(sealed, CTX)
    assert keyring.key_id_of(resealed) == "k2"
    assert keyring.open_str(resealed, CTX) == "secret"


def test_garbage_is_not_a_sealed_value(keyring: Keyring) -> None:
    for blob in (b"", b"\x02abc", b"\x01\x02k2" + b"\x00" * 5):
        with pytest.raises(DecryptionError):
            keyring.open(blob, CTX)


def test_blind_index_is_deterministic_keyed_and_stable_across_primary_rotation(keyring: Keyring) -> None:
    first = keyring.blind_index("phone", "+79991234567")
    assert first == keyring.blind_index("phone", "+79991234567")
    assert first != keyring.blind_index("phone", "+79991234568")
    assert first != keyring.blind_index("email", "+79991234567")
    assert "79991234567" not in first
    rotated = Keyring(keyring._roots, primary_id="k1", index_key_id="k2")
    assert rotated.blind_index("phone", "+79991234567") == first


def test_code_hash_is_bound_to_subject_and_checked(keyring: Keyring) -> None:
    stored = keyring.code_hash("ver-1", "123456")
    assert "123456" not in stored
    assert keyring.code_matches(stored, "ver-1", "123456")
    assert not keyring.code_matches(stored, "ver-1", "123457")
    assert not keyring.code_matches(stored, "ver-2", "123456")
    assert not keyring.code_matches("k404:" + stored.split(":")[1], "ver-1", "123456")


@pytest.mark.parametrize(
    "spec",
    ["", "nokey", "k1:not-base64!", "k1:" + "QUFB", "bad id:" + "A" * 44, "k1:" + "A" * 40],
)
def test_bad_keyring_specs_are_refused(spec: str) -> None:
    with pytest.raises(CryptoError):
        Keyring.parse(spec)


def test_primary_must_exist() -> None:
    with pytest.raises(UnknownKeyError):
        Keyring.parse(Keyring.generate_spec("k1"), primary_id="k2")
