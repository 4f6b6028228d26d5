"""TpmQuoter against a real swtpm on loopback: fresh quotes verify with our verifier, tampered
ones do not, exactly like the shipped vectors (these quotes were never seen before)."""
from __future__ import annotations

import base64
import socket
import subprocess
import threading
import uuid

import pytest

from nomyo.attestation import AttestationError, Reason, TpmQuoter, verify_tpm_attestation
from nomyo.errors import SecurityError
from tests.tpm_fixtures import FIELDS, assert_every_flip_rejected, block_of, running_swtpm


@pytest.fixture(scope="module")
def tcti():
    with running_swtpm() as tcti:
        yield tcti


@pytest.fixture(scope="module")
def ecc_quoter(tcti):
    with TpmQuoter(tcti) as quoter:
        yield quoter


def _tpm2(tcti: str, *args: str) -> str:
    proc = subprocess.run(args, env={"TPM2TOOLS_TCTI": tcti, "PATH": "/usr/bin:/bin"},
                          capture_output=True, check=True, timeout=60)
    return proc.stdout.decode()


def test_ecc_quote_verifies_with_raw_binding(ecc_quoter):
    payload_id = str(uuid.uuid4())
    block = ecc_quoter.quote(payload_id)
    assert set(block) == {"is_available", "pcr_banks", "pcr_values", "quote_b64",
                          "signature_b64", "aik_pubkey_b64"}
    assert block["is_available"] is True and block["pcr_banks"] == "sha256:0,7,10"
    assert set(block["pcr_values"]["sha256"]) == {"0", "7", "10"}
    result = verify_tpm_attestation(block, payload_id)
    assert result.valid, result.reasons
    assert result.binding == "raw" and result.signature_scheme == "ecdsa-sha256"


def test_long_payload_id_is_bound_by_its_sha256(ecc_quoter):
    payload_id = "openai-compat-1732000000000-" + "z" * 80
    result = verify_tpm_attestation(ecc_quoter.quote(payload_id), payload_id)
    assert result.valid and result.binding == "sha256"


@pytest.mark.parametrize("aik,scheme", [("rsa2048", "rsassa-sha256"),
                                        ("rsa2048-pss", "rsapss-sha256"),
                                        ("ecc384", "ecdsa-sha384")])
def test_other_aik_kinds_verify(tcti, aik, scheme):
    with TpmQuoter(tcti, "sha256:0,7,10+sha1:0,1", aik=aik) as quoter:
        payload_id = str(uuid.uuid4())
        block = quoter.quote(payload_id)
    result = verify_tpm_attestation(block, payload_id)
    assert result.valid, result.reasons
    assert result.signature_scheme == scheme
    assert block["pcr_banks"] == "sha256:0,7,10+sha1:0,1"


@pytest.mark.parametrize("aik", ["ecc256", "rsa2048-pss"])
def test_unseen_quotes_reject_every_flip_like_the_vectors(tcti, aik):
    with TpmQuoter(tcti, aik=aik) as quoter:
        payload_id = str(uuid.uuid4())
        block = quoter.quote(payload_id)
    assert verify_tpm_attestation(block, payload_id).valid
    for field in FIELDS:
        assert assert_every_flip_rejected(block, payload_id, field) > 500


def test_unseen_quotes_reject_pcr_id_and_aik_tampering(ecc_quoter):
    id_a, id_b = str(uuid.uuid4()), str(uuid.uuid4())
    a, b = ecc_quoter.quote(id_a), ecc_quoter.quote(id_b)
    assert a["aik_pubkey_b64"] != b["aik_pubkey_b64"]  # a fresh AIK per quote
    assert verify_tpm_attestation(a, id_b).reasons == [Reason.NONCE_MISMATCH]
    swapped = dict(a, aik_pubkey_b64=b["aik_pubkey_b64"])
    assert Reason.SIGNATURE_INVALID in verify_tpm_attestation(swapped, id_a).reasons
    for index in ("0", "7", "10"):
        changed = block_of(a)
        changed["pcr_values"]["sha256"][index] = "ab" * 32
        assert verify_tpm_attestation(changed, id_a).reasons == [Reason.PCR_DIGEST_MISMATCH]
    assert verify_tpm_attestation(dict(a, pcr_banks="sha256:0,7"), id_a).reasons == [
        Reason.PCR_SELECTION_MISMATCH]


def test_quotes_follow_pcr_extends_and_expected_pcrs(tcti, ecc_quoter):
    before = ecc_quoter.quote("before")
    _tpm2(tcti, "tpm2_pcrextend", "10:sha256=" + "11" * 32)
    after = ecc_quoter.quote("after")
    assert after["pcr_values"]["sha256"]["10"] != before["pcr_values"]["sha256"]["10"]
    assert after["pcr_values"]["sha256"]["0"] == before["pcr_values"]["sha256"]["0"]
    pinned = {"sha256": {10: after["pcr_values"]["sha256"]["10"]}}
    assert verify_tpm_attestation(after, "after", expected_pcrs=pinned).valid
    stale = verify_tpm_attestation(before, "before", expected_pcrs=pinned)
    assert stale.reasons == [Reason.EXPECTED_PCRS_MISMATCH]
    # the old quote with the new values: the digest no longer matches
    mixed = dict(before, pcr_values=after["pcr_values"])
    assert verify_tpm_attestation(mixed, "before").reasons == [Reason.PCR_DIGEST_MISMATCH]


def test_concurrent_quotes_are_serialised_and_leave_no_transient_objects(tcti, ecc_quoter):
    results: dict[int, bool] = {}
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            payload_id = f"thread-{n}"
            results[n] = verify_tpm_attestation(ecc_quoter.quote(payload_id), payload_id).valid
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == {n: True for n in range(6)}
    assert "0x80" not in _tpm2(tcti, "tpm2_getcap", "handles-transient")


def test_unreachable_tpm_is_a_typed_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    with pytest.raises(AttestationError) as info:
        TpmQuoter(f"swtpm:host=127.0.0.1,port={port}")
    assert isinstance(info.value, SecurityError) and str(port) in str(info.value)


def test_closed_quoter_refuses(tcti):
    quoter = TpmQuoter(tcti)
    quoter.close()
    quoter.close()
    with pytest.raises(AttestationError):
        quoter.quote("x")


@pytest.mark.parametrize("kwargs", [{"pcrs": "sha256:0,7,99"}, {"pcrs": "md5:0"},
                                    {"aik": "dsa"}, {"tcti": "swtpm:\nport=1"}, {"tcti": ""}])
def test_bad_configuration_is_a_value_error(tcti, kwargs):
    args = {"tcti": tcti, **kwargs}
    with pytest.raises(ValueError):
        TpmQuoter(args.pop("tcti"), **args)


@pytest.mark.parametrize("payload_id", ["", None, "x" * 5000], ids=["empty", "none", "huge"])
def test_bad_payload_id_is_a_value_error(ecc_quoter, payload_id):
    with pytest.raises(ValueError):
        ecc_quoter.quote(payload_id)


def test_quote_bytes_have_the_vector_layouts(ecc_quoter):
    """Same encodings as the vectors: bare TPMS_ATTEST, bare TPMT_SIGNATURE, TPM2B_PUBLIC."""
    block = ecc_quoter.quote(str(uuid.uuid4()))
    quote = base64.b64decode(block["quote_b64"])
    sig = base64.b64decode(block["signature_b64"])
    aik = base64.b64decode(block["aik_pubkey_b64"])
    assert quote[:6] == bytes.fromhex("ff5443478018") and len(quote) == 149
    assert sig[:6] == bytes.fromhex("0018000b0020") and len(sig) == 72
    assert int.from_bytes(aik[:2], "big") == len(aik) - 2 == 88
