"""TpmQuoter against a real swtpm on loopback: fresh quotes verify with our verifier, tampered
ones do not, exactly like the shipped vectors (these quotes were never seen before)."""
from __future__ import annotations

import base64
import logging
import multiprocessing
import os
import shutil
import socket
import subprocess
import tempfile
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


def test_unreachable_tpm_is_a_typed_error(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    with pytest.raises(AttestationError) as info:
        TpmQuoter(f"swtpm:host=127.0.0.1,port={port}")
    assert isinstance(info.value, SecurityError) and str(port) in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no working directory left behind


def test_closed_quoter_refuses_and_leaves_nothing(tcti, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    quoter = TpmQuoter(tcti)
    assert len(list(tmp_path.iterdir())) == 1
    quoter.close()
    assert list(tmp_path.iterdir()) == []
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


@pytest.mark.parametrize("pcrs", ["sha1:0+sha256:0,7",
                                  "sha256:0,1,2,3,4,5,6,7,8,9,10,11,12,16,23",
                                  "sha512:0,7+sha384:1+sha256:2,3+sha1:4"])
def test_pcr_selections_keep_their_bank_order(tcti, pcrs):
    """Values are reported in the quote's selection order, also past 8 PCRs per read."""
    with TpmQuoter(tcti, pcrs) as quoter:
        block = quoter.quote("banks")
    assert block["pcr_banks"] == pcrs
    assert verify_tpm_attestation(block, "banks").valid


def test_quoter_survives_a_tpm_restart(caplog):
    """After a power cycle the primary's saved context is dead; the quoter makes a new one."""
    if shutil.which("swtpm_ioctl") is None:
        pytest.skip("TPM restart test needs swtpm_ioctl (Debian package swtpm-tools)")
    with running_swtpm() as tcti, TpmQuoter(tcti) as quoter:
        assert verify_tpm_attestation(quoter.quote("one"), "one").valid
        ctrl_port = int(tcti.rsplit("=", 1)[1]) + 1
        _tpm2(tcti, "swtpm_ioctl", "--tcp", f"127.0.0.1:{ctrl_port}", "-i")
        _tpm2(tcti, "tpm2_startup", "-c")
        with caplog.at_level(logging.INFO, logger="nomyo.attestation.quote"):
            assert verify_tpm_attestation(quoter.quote("two"), "two").valid
    assert "re-creating the TPM storage primary" in caplog.text


@pytest.mark.parametrize("aik", ["ecc256", "rsa2048"])
def test_an_independent_verifier_agrees(tcti, aik, tmp_path):
    """tpm2_checkquote (tpm2-tools' own verifier) accepts our quotes and rejects a tampered
    one, as ours does. (It cannot check RSAPSS quotes: tpm2-tools issue #3283.)"""
    with TpmQuoter(tcti, aik=aik) as quoter:
        block = quoter.quote("oracle")
    for name, key in (("aik.pub", "aik_pubkey_b64"), ("quote.msg", "quote_b64"),
                      ("quote.sig", "signature_b64")):
        (tmp_path / name).write_bytes(base64.b64decode(block[key]))

    def checkquote() -> int:
        return subprocess.run(
            ["tpm2_checkquote", "-u", "aik.pub", "-m", "quote.msg", "-s", "quote.sig",
             "-g", "sha256", "-q", b"oracle".hex()],
            cwd=tmp_path, capture_output=True, timeout=60, check=False).returncode

    assert checkquote() == 0 and verify_tpm_attestation(block, "oracle").valid
    quote = bytearray((tmp_path / "quote.msg").read_bytes())
    quote[-1] ^= 1
    (tmp_path / "quote.msg").write_bytes(bytes(quote))
    block["quote_b64"] = base64.b64encode(bytes(quote)).decode()
    assert checkquote() != 0 and not verify_tpm_attestation(block, "oracle").valid


def _quote_in_child(quoter: TpmQuoter, tag: str) -> None:
    """Child body: several quotes that must all verify; the exit code reports it."""
    ok = True
    for n in range(3):
        payload_id = f"{tag}-{n}"
        try:
            ok = ok and verify_tpm_attestation(quoter.quote(payload_id), payload_id).valid
        except Exception:  # noqa: BLE001 - reported through the exit code
            ok = False
    os._exit(0 if ok else 1)


def test_forked_workers_share_the_tpm_safely(tcti):
    """`nomyo serve --workers N` forks after making the quoter: the children and the parent
    quote at the same time without flushing each other's objects, and a child exiting does
    not remove the parent's working directory."""
    ctx = multiprocessing.get_context("fork")
    with TpmQuoter(tcti) as quoter:
        children = [ctx.Process(target=_quote_in_child, args=(quoter, f"child{n}"))
                    for n in range(3)]
        for child in children:
            child.start()
        parent_ok = [verify_tpm_attestation(quoter.quote(f"parent-{n}"), f"parent-{n}").valid
                     for n in range(3)]
        for child in children:
            child.join(timeout=120)
        assert [child.exitcode for child in children] == [0, 0, 0]
        assert parent_ok == [True, True, True]
        assert verify_tpm_attestation(quoter.quote("after"), "after").valid
