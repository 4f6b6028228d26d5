"""verify_tpm_attestation against the six swtpm vectors, every single-byte tamper of them, and
software-signed quotes for the schemes, curves and banks the vectors do not cover."""
from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

import nomyo
from nomyo.attestation import AttestationResult, Reason, verify_tpm_attestation
from tests.tpm_fixtures import (
    FIELDS,
    NODA_FLIP,
    assert_every_flip_rejected,
    block_of,
    flip,
    load_vectors,
    soft_block,
)

VECTORS = load_vectors()
NAMES = sorted(VECTORS)


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(65537, 2048)


@pytest.fixture(scope="module")
def p256_key():
    return ec.generate_private_key(ec.SECP256R1())


_OWN_ID = object()


def verify(vector_name: str, block: dict | None = None, payload_id=_OWN_ID, **kw):
    vector = VECTORS[vector_name]
    return verify_tpm_attestation(block or block_of(vector),
                                  vector["payload_id"] if payload_id is _OWN_ID else payload_id,
                                  **kw)


# ---- the vectors ----

@pytest.mark.parametrize("name", NAMES)
def test_vector_verifies(name):
    result = verify(name)
    assert result.valid, result.reasons
    assert result.reasons == []
    assert (result.signature_valid, result.aik_restricted_signing, result.scheme_matches,
            result.nonce_bound, result.pcr_digest_matches) == (True,) * 5
    assert result.expected_pcrs_match is None
    assert result.binding == VECTORS[name]["binding"]
    assert VECTORS[name]["aik_alg"].endswith(result.signature_scheme)
    assert result.pcr_values == VECTORS[name]["pcr_values"]
    assert result.aik_certified is False
    assert result.firmware_version == 0x2019102300163636  # swtpm / libtpms, per the README
    assert set(result.clock_info) == {"clock", "reset_count", "restart_count", "safe"}
    assert "not certified" in result.note and "not certified" in AttestationResult.__doc__


def test_public_name_is_exported():
    assert nomyo.verify_tpm_attestation is verify_tpm_attestation
    assert nomyo.AttestationResult is AttestationResult


@pytest.mark.parametrize("name", NAMES)
def test_aik_name_and_qualified_signer_match_the_notes(name):
    """The parser's Name is right, and the quote's qualifiedSigner is the QN the notes derive
    from the parent's QN (which only the notes, not the protocol block, carry)."""
    notes = dict(part.split("=", 1) for part in VECTORS[name]["notes"].split()
                 if part.startswith(("aik_name=", "aik_qualified_name=", "parent_qualified_")))
    result = verify(name)
    assert result.aik_name == notes["aik_name"]
    qn = "000b" + hashlib.sha256(bytes.fromhex(
        notes["parent_qualified_name"] + notes["aik_name"])).hexdigest()
    assert result.qualified_signer == notes["aik_qualified_name"] == qn


def test_vector_with_extra_keys_still_verifies():
    vector = VECTORS[NAMES[0]]
    assert verify_tpm_attestation(dict(vector), vector["payload_id"]).valid


# ---- every single-byte flip ----

@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("name", NAMES)
def test_every_single_byte_flip_is_rejected(name, field):
    """Every bit of every byte, and every byte inverted, of quote, signature and AIK."""
    vector = VECTORS[name]
    assert assert_every_flip_rejected(block_of(vector), vector["payload_id"], field) > 500


@pytest.mark.parametrize("field", FIELDS)
def test_trailing_and_truncated_fields_are_rejected(field):
    vector = VECTORS["ecc_p256_ecdsa_raw"]
    raw = base64.b64decode(vector[field])
    for data in [raw + b"\0", raw + raw] + [raw[:n] for n in range(len(raw))]:
        block = block_of(vector)
        block[field] = base64.b64encode(data).decode()
        result = verify_tpm_attestation(block, vector["payload_id"])
        assert not result.valid and result.reasons


# ---- PCRs, payload id, AIK swap, binding ----

@pytest.mark.parametrize("name", NAMES)
def test_each_changed_pcr_value_is_rejected(name):
    vector = VECTORS[name]
    for index, value in vector["pcr_values"]["sha256"].items():
        for changed in (value[:-1] + ("0" if value[-1] != "0" else "1"), "00" * 32, "ff" * 32):
            block = block_of(vector)
            block["pcr_values"]["sha256"][index] = changed
            result = verify_tpm_attestation(block, vector["payload_id"])
            assert not result.valid
            assert result.reasons == [Reason.PCR_DIGEST_MISMATCH]
            assert result.signature_valid and result.nonce_bound


@pytest.mark.parametrize("pcr_values", [
    {},
    {"sha256": {}},
    {"sha256": {"0": "00", "7": "00", "10": "00"}},
    {"sha256": {"0": "zz" * 32, "7": "00" * 32, "10": "00" * 32}},
    {"sha256": {"0": "0 " * 32, "7": "00" * 32, "10": "00" * 32}},
    {"sha1": {"0": "00" * 20, "7": "00" * 20, "10": "00" * 20}},
    "sha256:0",
    None,
])
def test_malformed_pcr_values_are_rejected(pcr_values):
    block = block_of(VECTORS[NAMES[0]])
    block["pcr_values"] = pcr_values
    result = verify(NAMES[0], block)
    assert not result.valid and result.reasons == [Reason.PCR_VALUES_INVALID]


def test_extra_reported_pcr_is_rejected():
    block = block_of(VECTORS[NAMES[0]])
    block["pcr_values"]["sha256"]["1"] = "00" * 32
    assert verify(NAMES[0], block).reasons == [Reason.PCR_VALUES_INVALID]


@pytest.mark.parametrize("banks,reason", [
    ("sha256:0,7", Reason.PCR_SELECTION_MISMATCH),
    ("sha256:0,7,11", Reason.PCR_SELECTION_MISMATCH),
    ("sha256:0,7,10,11", Reason.PCR_SELECTION_MISMATCH),
    ("sha1:0,7,10", Reason.PCR_SELECTION_MISMATCH),
    ("sha384:0,7,10", Reason.PCR_SELECTION_MISMATCH),
    ("sha256:0,7,10+sha1:0", Reason.PCR_SELECTION_MISMATCH),
    ("sha256:0,7,99", Reason.PCR_BANKS_INVALID),
    ("sha256:\u0660,\u0667,\u0661\u0660", Reason.PCR_BANKS_INVALID),  # Arabic-Indic digits
    ("md5:0,7,10", Reason.PCR_BANKS_INVALID),
    ("sha256", Reason.PCR_BANKS_INVALID),
    ("sha256:0,7,10+sha256:0", Reason.PCR_BANKS_INVALID),
    ("", Reason.PCR_BANKS_INVALID),
    (7, Reason.PCR_BANKS_INVALID),
    ("sha256:" + ",".join(["1"] * 2000), Reason.PCR_BANKS_INVALID),
], ids=lambda v: str(v)[:30])
def test_changed_pcr_banks_is_rejected(banks, reason):
    block = block_of(VECTORS[NAMES[0]])
    block["pcr_banks"] = banks
    result = verify(NAMES[0], block)
    assert not result.valid and result.reasons == [reason]


def test_pcr_banks_order_and_spacing_are_normalised():
    block = block_of(VECTORS[NAMES[0]])
    block["pcr_banks"] = "SHA256:10, 7,0"
    assert verify(NAMES[0], block).valid


@pytest.mark.parametrize("name", NAMES)
def test_wrong_payload_id_is_rejected(name):
    real = VECTORS[name]["payload_id"]
    for wrong in (real[:-1] + ("0" if real[-1] != "0" else "1"), real.upper(), real + " ",
                  "00000000-0000-4000-8000-000000000000"):
        result = verify(name, payload_id=wrong)
        assert not result.valid
        assert result.reasons == [Reason.NONCE_MISMATCH]
        assert not result.nonce_bound and result.binding is None
        assert result.signature_valid


@pytest.mark.parametrize("name", NAMES)
def test_only_raw_or_sha256_binding_is_accepted(name):
    """Hex of the digest, SHA-1, double SHA-256 or another vector's id never bind."""
    real = VECTORS[name]["payload_id"]
    digest = hashlib.sha256(real.encode()).digest()
    for other in (digest.hex(), hashlib.sha1(real.encode()).hexdigest(),
                  base64.b64encode(digest).decode(),
                  VECTORS[NAMES[(NAMES.index(name) + 1) % len(NAMES)]]["payload_id"]):
        result = verify(name, payload_id=other)
        assert result.reasons == [Reason.NONCE_MISMATCH]


@pytest.mark.parametrize("payload_id", ["", None, 5, b"bytes", "x" * (64 * 1024 + 1),
                                        "\ud800"],
                         ids=["empty", "none", "int", "bytes", "huge", "surrogate"])
def test_bad_payload_id_is_an_invalid_result(payload_id):
    result = verify(NAMES[0], payload_id=payload_id)
    assert not result.valid and Reason.PAYLOAD_ID_INVALID in result.reasons


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("donor", NAMES)
def test_aik_swapped_between_vectors_is_rejected(name, donor):
    if name == donor:
        return
    block = block_of(VECTORS[name])
    block["aik_pubkey_b64"] = VECTORS[donor]["aik_pubkey_b64"]
    result = verify(name, block)
    assert not result.valid
    assert Reason.SIGNATURE_INVALID in result.reasons
    assert not result.signature_valid


def test_signature_swapped_between_vectors_is_rejected():
    for name in NAMES:
        for donor in NAMES:
            if name != donor:
                block = block_of(VECTORS[name])
                block["signature_b64"] = VECTORS[donor]["signature_b64"]
                assert not verify(name, block).valid


# ---- expected_pcrs ----

def test_expected_pcrs_match_full_and_subset():
    name = NAMES[0]
    values = VECTORS[name]["pcr_values"]["sha256"]
    full = {"sha256": {int(k): v.upper() for k, v in values.items()}}
    result = verify(name, expected_pcrs=full)
    assert result.valid and result.expected_pcrs_match is True
    subset = {"sha256": {"7": values["7"]}}
    assert verify(name, expected_pcrs=subset).expected_pcrs_match is True


@pytest.mark.parametrize("expected", [
    {"sha256": {0: "00" * 32}},
    {"sha256": {1: "00" * 32}},
    {"sha1": {0: "00" * 20}},
    {"sha384": {0: "00" * 48}},
])
def test_expected_pcrs_mismatch(expected):
    result = verify(NAMES[0], expected_pcrs=expected)
    assert not result.valid
    assert result.expected_pcrs_match is False
    assert result.reasons == [Reason.EXPECTED_PCRS_MISMATCH]
    assert result.signature_valid and result.pcr_digest_matches


@pytest.mark.parametrize("expected", [{}, [], "sha256:0", {"sha256": []}, {"md5": {0: "00"}},
                                      {"sha256": {0: "zz"}}, {"sha256": {"x": "00"}},
                                      {"sha256": {-1: "00"}}, {"sha256": {True: "00"}},
                                      {"sha256": {0: None}}, {"sha256": {0: "00"}},
                                      {"sha256": {0: "00 " * 31 + "00"}},
                                      {"sha256": {"1_0": "00" * 32}}])
def test_malformed_expected_pcrs(expected):
    result = verify(NAMES[0], expected_pcrs=expected)
    assert not result.valid and result.expected_pcrs_match is False
    assert result.reasons == [Reason.EXPECTED_PCRS_INVALID]


def test_expected_pcrs_on_a_broken_quote_never_match():
    block = block_of(VECTORS[NAMES[0]])
    block["pcr_values"]["sha256"]["0"] = "00" * 32
    result = verify(NAMES[0], block, expected_pcrs={"sha256": {0: "00" * 32}})
    assert not result.valid and result.expected_pcrs_match is False


# ---- wrong shapes ----

@pytest.mark.parametrize("block", [{"is_available": False}, {}, {"is_available": "true"},
                                   {"is_available": 1}])
def test_not_available(block):
    result = verify_tpm_attestation(block, "id")
    assert not result.valid and result.reasons == [Reason.NOT_AVAILABLE]


@pytest.mark.parametrize("value", [None, [], "x", b"x", 5, ({"is_available": True},)])
def test_non_dict_raises_type_error(value):
    with pytest.raises(TypeError):
        verify_tpm_attestation(value, "id")


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("value,reason", [
    (None, Reason.FIELD_MISSING),
    (5, Reason.BASE64_INVALID),
    (["AAAA"], Reason.BASE64_INVALID),
    ("not base64!", Reason.BASE64_INVALID),
    ("AAA", Reason.BASE64_INVALID),
    ("é" * 8, Reason.BASE64_INVALID),
    ("A" * (100 * 1024 * 1024), Reason.FIELD_TOO_LARGE),
], ids=["missing", "int", "list", "not-b64", "bad-padding", "non-ascii", "100MiB"])
def test_wrong_field_types(field, value, reason):
    block = block_of(VECTORS[NAMES[0]])
    if value is None:
        del block[field]
    else:
        block[field] = value
    result = verify(NAMES[0], block)
    assert not result.valid and reason in result.reasons


def test_results_are_json_ready():
    import json
    data = verify(NAMES[0]).to_dict()
    assert json.loads(json.dumps(data))["valid"] is True
    assert data["aik_certified"] is False and "not certified" in data["note"]


# ---- software-signed quotes: schemes, curves, banks, key profiles ----

def test_rsapss_both_salt_conventions_and_nothing_else(rsa_key):
    for salt, ok in ((32, True), (222, True), (20, False), (0, False), (100, False)):
        block = soft_block(rsa_key, "rsapss", "pid", pss_salt=salt)
        result = verify_tpm_attestation(block, "pid")
        assert result.valid is ok, (salt, result.reasons)


@pytest.mark.parametrize("curve,hash_name", [(ec.SECP256R1, "sha256"), (ec.SECP384R1, "sha384"),
                                             (ec.SECP521R1, "sha512"), (ec.SECP256R1, "sha1")])
def test_ecdsa_curves_and_hashes(curve, hash_name):
    key = ec.generate_private_key(curve())
    result = verify_tpm_attestation(soft_block(key, "ecdsa", "pid", hash_name=hash_name), "pid")
    assert result.valid, result.reasons
    assert result.signature_scheme == f"ecdsa-{hash_name}"


@pytest.mark.parametrize("scheme", ["rsassa", "rsapss"])
@pytest.mark.parametrize("hash_name", ["sha1", "sha384", "sha512"])
def test_rsa_hashes(rsa_key, scheme, hash_name):
    block = soft_block(rsa_key, scheme, "pid", hash_name=hash_name, binding="sha256")
    result = verify_tpm_attestation(block, "pid")
    assert result.valid and result.binding == "sha256", result.reasons


def test_multiple_banks_are_hashed_in_selection_order(p256_key):
    banks = {"sha1": {0: b"\x01" * 20, 16: b"\x02" * 20},
             "sha256": {23: b"\x03" * 32, 0: b"\x04" * 32},
             "sha384": {7: b"\x05" * 48}}
    block = soft_block(p256_key, "ecdsa", "pid", banks=banks)
    assert block["pcr_banks"] == "sha1:0,16+sha256:0,23+sha384:7"
    assert verify_tpm_attestation(block, "pid").valid
    result = verify_tpm_attestation(block, "pid", expected_pcrs={"sha1": {16: "02" * 20}})
    assert result.valid and result.expected_pcrs_match
    reordered = dict(block, pcr_banks="sha256:0,23+sha1:0,16+sha384:7")
    assert verify_tpm_attestation(reordered, "pid").reasons == [Reason.PCR_SELECTION_MISMATCH]


@pytest.mark.parametrize("attrs,reason", [
    (0x00040072, Reason.AIK_NOT_RESTRICTED_SIGNING),   # sign, not restricted
    (0x00030072, Reason.AIK_NOT_RESTRICTED_SIGNING),   # restricted decrypt (storage key)
    (0x00070072, Reason.AIK_NOT_RESTRICTED_SIGNING),   # restricted sign + decrypt
    (0x00050070, Reason.AIK_ATTRIBUTES_INVALID),       # not fixedTPM
    (0x00050062, Reason.AIK_ATTRIBUTES_INVALID),       # not fixedParent
    (0x00050052, Reason.AIK_ATTRIBUTES_INVALID),       # not sensitiveDataOrigin
    (0x00050032, Reason.AIK_ATTRIBUTES_INVALID),       # not userWithAuth
    (0x000500F2, Reason.AIK_ATTRIBUTES_INVALID),       # adminWithPolicy
    (0x00050076, Reason.AIK_ATTRIBUTES_INVALID),       # stClear
    (0x00050872, Reason.AIK_ATTRIBUTES_INVALID),       # encryptedDuplication
    (0x000D0072, Reason.AIK_ATTRIBUTES_INVALID),       # x509sign
    (0x80050072, Reason.AIK_ATTRIBUTES_INVALID),       # reserved bit
])
def test_aik_must_have_the_attestation_key_profile(p256_key, attrs, reason):
    result = verify_tpm_attestation(soft_block(p256_key, "ecdsa", "pid", attrs=attrs), "pid")
    assert not result.valid and not result.aik_restricted_signing
    assert result.reasons == [reason]
    assert result.signature_valid  # each check is reported separately


def test_optional_noda_is_accepted(p256_key):
    """noDA is the one attribute allowed to vary; like every attribute it is not covered by
    the quote's signature (only by the qualified name, which needs the parent's), so flipping
    it in a real vector's AIK still verifies. That is inherent, not a parser gap."""
    attrs = 0x00050072 | (1 << 10)
    assert verify_tpm_attestation(soft_block(p256_key, "ecdsa", "pid", attrs=attrs), "pid").valid
    vector = VECTORS[NAMES[0]]
    block = block_of(vector)
    block[NODA_FLIP[0]] = flip(block[NODA_FLIP[0]], NODA_FLIP[1], NODA_FLIP[2])
    result = verify_tpm_attestation(block, vector["payload_id"])
    assert result.valid and result.aik_name != verify(NAMES[0]).aik_name


def test_key_scheme_must_match_signature(rsa_key):
    block = soft_block(rsa_key, "rsapss", "pid", key_scheme=0x0014)
    result = verify_tpm_attestation(block, "pid")
    assert not result.scheme_matches and result.signature_valid
    assert result.reasons == [Reason.AIK_SCHEME_MISMATCH]
    null = verify_tpm_attestation(soft_block(rsa_key, "rsassa", "pid", key_scheme=0x0010), "pid")
    assert null.reasons == [Reason.AIK_SCHEME_MISMATCH]


def test_small_or_odd_rsa_keys_are_refused():
    small = rsa.generate_private_key(65537, 1024)
    result = verify_tpm_attestation(soft_block(small, "rsassa", "pid"), "pid")
    assert Reason.AIK_KEY_INVALID in result.reasons and not result.valid
    three = rsa.generate_private_key(3, 2048)
    assert verify_tpm_attestation(soft_block(three, "rsassa", "pid"), "pid").valid


def test_ecdsa_signature_from_another_curve_key_is_rejected(p256_key):
    block = soft_block(p256_key, "ecdsa", "pid")
    other = soft_block(ec.generate_private_key(ec.SECP256R1()), "ecdsa", "pid")
    block["aik_pubkey_b64"] = other["aik_pubkey_b64"]
    assert verify_tpm_attestation(block, "pid").reasons == [Reason.SIGNATURE_INVALID]


def test_long_payload_id_uses_sha256_binding(p256_key):
    pid = "openai-compat-" + "x" * 200
    result = verify_tpm_attestation(soft_block(p256_key, "ecdsa", pid, binding="sha256"), pid)
    assert result.valid and result.binding == "sha256"
