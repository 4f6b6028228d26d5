"""Verify a `tpm_attestation` block (docs/protocol.md) against the request's payload id.

Pure Python on `cryptography`: the quote's signature with the AIK it carries, the AIK's
attributes and scheme, the binding of `extraData` to the payload id, and the PCR digest
against the reported PCR values. Any malformed input ends in an invalid result, never an
exception (except `TypeError` for an `attestation` that is not a dict).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from nomyo.attestation import tpm_structures as ts

log = logging.getLogger(__name__)

MAX_FIELD_BYTES = 64 * 1024
MAX_B64_CHARS = 4 * ((MAX_FIELD_BYTES + 2) // 3)
MAX_QUOTED_PAYLOAD_ID_CHARS = 64 * 1024  # a verifier's bound on input, not the wire limit
MAX_PCR_BANKS_CHARS = 1024
MIN_RSA_BITS = 2048

NOT_CERTIFIED_NOTE = (
    "The AIK is a fresh key that is not certified by an endorsement key (no EK certificate "
    "chain is checked), so a valid quote proves consistency and freshness (this signed quote "
    "was made for this payload id over these PCR values), not that the TPM is genuine."
)

_CRYPTO_HASHES = {
    ts.ALG_SHA1: hashes.SHA1,
    ts.ALG_SHA256: hashes.SHA256,
    ts.ALG_SHA384: hashes.SHA384,
    ts.ALG_SHA512: hashes.SHA512,
}
_CRYPTO_CURVES = {0x0003: ec.SECP256R1, 0x0004: ec.SECP384R1, 0x0005: ec.SECP521R1}


class Reason:
    """Stable machine-readable failure reasons found in `AttestationResult.reasons`."""

    NOT_AVAILABLE = "not_available"
    PAYLOAD_ID_INVALID = "payload_id_invalid"
    FIELD_MISSING = "field_missing"
    FIELD_TOO_LARGE = "field_too_large"
    BASE64_INVALID = "base64_invalid"
    QUOTE_MALFORMED = "quote_malformed"
    QUOTE_WRONG_MAGIC = "quote_wrong_magic"
    QUOTE_WRONG_TYPE = "quote_wrong_type"
    SIGNATURE_MALFORMED = "signature_malformed"
    SIGNATURE_SCHEME_UNSUPPORTED = "signature_scheme_unsupported"
    SIGNATURE_INVALID = "signature_invalid"
    AIK_MALFORMED = "aik_malformed"
    AIK_UNSUPPORTED = "aik_unsupported"
    AIK_KEY_INVALID = "aik_key_invalid"
    AIK_NOT_RESTRICTED_SIGNING = "aik_not_restricted_signing"
    AIK_ATTRIBUTES_INVALID = "aik_attributes_invalid"
    AIK_SCHEME_MISMATCH = "aik_scheme_mismatch"
    QUALIFIED_SIGNER_INCONSISTENT = "qualified_signer_inconsistent"
    NONCE_MISMATCH = "nonce_mismatch"
    PCR_BANKS_INVALID = "pcr_banks_invalid"
    PCR_SELECTION_MISMATCH = "pcr_selection_mismatch"
    PCR_VALUES_INVALID = "pcr_values_invalid"
    PCR_DIGEST_MISMATCH = "pcr_digest_mismatch"
    EXPECTED_PCRS_INVALID = "expected_pcrs_invalid"
    EXPECTED_PCRS_MISMATCH = "expected_pcrs_mismatch"
    VERIFIER_ERROR = "verifier_error"


@dataclass(frozen=True)
class AttestationResult:
    """Outcome of `verify_tpm_attestation`: each check separately, the verdict, the reasons.

    The AIK is not certified by an endorsement key: a valid result proves that the quote is
    consistent and fresh (bound to this payload id), not that the TPM is genuine hardware.
    """

    valid: bool
    signature_valid: bool = False
    aik_restricted_signing: bool = False
    scheme_matches: bool = False
    nonce_bound: bool = False
    pcr_digest_matches: bool = False
    expected_pcrs_match: bool | None = None
    binding: str | None = None  # "raw" (UTF-8 payload id) or "sha256" (its digest)
    reasons: list[str] = field(default_factory=list)
    signature_scheme: str | None = None  # e.g. "ecdsa-sha256"
    pcr_values: dict[str, dict[str, str]] | None = None  # as quoted, when the digest matched
    aik_name: str | None = None  # hex TPM Name of the AIK
    qualified_signer: str | None = None  # hex, from the quote (parent QN not carried)
    firmware_version: int | None = None  # TPMS_ATTEST.firmwareVersion (vendor-defined)
    clock_info: dict[str, int] | None = None  # clock (ms), resetCount, restartCount, safe
    aik_certified: bool = False  # always False: no endorsement-key certificate is checked
    note: ClassVar[str] = NOT_CERTIFIED_NOTE

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (e.g. for a response's `_metadata`)."""
        return {
            "valid": self.valid,
            "signature_valid": self.signature_valid,
            "aik_restricted_signing": self.aik_restricted_signing,
            "scheme_matches": self.scheme_matches,
            "nonce_bound": self.nonce_bound,
            "pcr_digest_matches": self.pcr_digest_matches,
            "expected_pcrs_match": self.expected_pcrs_match,
            "binding": self.binding,
            "reasons": list(self.reasons),
            "signature_scheme": self.signature_scheme,
            "aik_name": self.aik_name,
            "qualified_signer": self.qualified_signer,
            "firmware_version": self.firmware_version,
            "clock_info": self.clock_info,
            "aik_certified": self.aik_certified,
            "note": self.note,
        }


_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def _hex_digest(value: Any, size: int) -> bytes | None:
    """Exactly `size` bytes written as 2 * size hex digits (nothing else), or None."""
    if isinstance(value, str) and len(value) == 2 * size and _HEX_DIGITS.issuperset(value):
        return bytes.fromhex(value)
    return None


def _pcr_index(value: Any) -> int | None:
    """A PCR index from an int or a string of at most two ASCII digits, or None."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 2:
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < ts.MAX_PCR_INDEX:
        return value
    return None


def parse_pcr_banks(text: Any) -> tuple[ts.PcrSelection, ...]:
    """Parse `sha256:0,7,10` (banks joined by `+`, as tpm2-tools writes) into selections."""
    if not isinstance(text, str) or not text or len(text) > MAX_PCR_BANKS_CHARS:
        raise ts.TpmFormatError(Reason.PCR_BANKS_INVALID)
    selections = []
    seen_banks = set()
    for bank_text in text.split("+"):
        name, sep, idx_text = bank_text.partition(":")
        alg = ts.HASH_IDS_BY_NAME.get(name.strip().lower())
        if not sep or alg is None or alg in seen_banks:
            raise ts.TpmFormatError(Reason.PCR_BANKS_INVALID, "bank")
        seen_banks.add(alg)
        indices = set()
        for item in idx_text.split(","):
            index = _pcr_index(item.strip())
            if index is None:
                raise ts.TpmFormatError(Reason.PCR_BANKS_INVALID, "index")
            indices.add(index)
        selections.append(ts.PcrSelection(alg, tuple(sorted(indices))))
    if len(selections) > ts.MAX_PCR_BANKS:
        raise ts.TpmFormatError(Reason.PCR_BANKS_INVALID, "too many banks")
    return tuple(selections)


def _b64_field(attestation: Mapping[str, Any], key: str) -> bytes:
    value = attestation.get(key)
    if value is None:
        raise ts.TpmFormatError(Reason.FIELD_MISSING, key)
    if not isinstance(value, str):
        raise ts.TpmFormatError(Reason.BASE64_INVALID, key)
    if len(value) > MAX_B64_CHARS:
        raise ts.TpmFormatError(Reason.FIELD_TOO_LARGE, key)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ts.TpmFormatError(Reason.BASE64_INVALID, key) from None


def _pcr_values(reported: Any, selections: tuple[ts.PcrSelection, ...]
                ) -> tuple[list[bytes], dict[str, dict[str, str]]]:
    """The reported PCR values in quote order, and as {bank: {index: lowercase hex}}; they
    must cover exactly the quoted selection."""
    if not isinstance(reported, dict) or len(reported) != len(selections):
        raise ts.TpmFormatError(Reason.PCR_VALUES_INVALID, "banks")
    values = []
    normalised: dict[str, dict[str, str]] = {}
    for sel in selections:
        name, size = ts.HASH_ALGS[sel.hash_alg]
        normalised[name] = {}
        bank = reported.get(name)
        if not isinstance(bank, dict) or len(bank) != len(sel.indices):
            raise ts.TpmFormatError(Reason.PCR_VALUES_INVALID, name)
        for idx in sel.indices:
            value = bank.get(str(idx))
            digest = _hex_digest(value, size)
            if digest is None:
                raise ts.TpmFormatError(Reason.PCR_VALUES_INVALID, f"{name}:{idx}")
            values.append(digest)
            normalised[name][str(idx)] = digest.hex()
    return values, normalised


def validate_expected_pcrs(expected: Any) -> None:
    """Raise ValueError for an `expected_pcrs` that can never match, so a caller can refuse
    it once, up front, instead of failing every response."""
    try:
        _normalise_expected(expected)
    except ts.TpmFormatError:
        raise ValueError(
            "expected_pcrs must be {bank: {index: hex digest}}, e.g. {'sha256': {0: '18cb...'}}"
        ) from None


def _normalise_expected(expected: Any) -> dict[str, dict[int, bytes]]:
    """{bank: {index: hex}} with int or str indices -> {bank: {int: bytes}}."""
    if not isinstance(expected, Mapping) or not expected:
        raise ts.TpmFormatError(Reason.EXPECTED_PCRS_INVALID)
    out: dict[str, dict[int, bytes]] = {}
    for bank, values in expected.items():
        if not isinstance(bank, str) or bank.lower() not in ts.HASH_IDS_BY_NAME:
            raise ts.TpmFormatError(Reason.EXPECTED_PCRS_INVALID, "bank")
        if not isinstance(values, Mapping) or not values:
            raise ts.TpmFormatError(Reason.EXPECTED_PCRS_INVALID, "values")
        size = ts.HASH_ALGS[ts.HASH_IDS_BY_NAME[bank.lower()]][1]
        bank_out = out.setdefault(bank.lower(), {})
        for idx, value in values.items():
            index, digest = _pcr_index(idx), _hex_digest(value, size)
            if index is None or digest is None:
                raise ts.TpmFormatError(Reason.EXPECTED_PCRS_INVALID, "entry")
            bank_out[index] = digest
    return out


def _public_key(aik: ts.PublicKey) -> Any:
    """A `cryptography` public key for the AIK; refuses small RSA and off-curve points."""
    if aik.key_type == ts.ALG_RSA:
        n = int.from_bytes(aik.rsa_modulus, "big")
        if (aik.rsa_key_bits < MIN_RSA_BITS or n.bit_length() != aik.rsa_key_bits
                or aik.rsa_exponent < 3 or aik.rsa_exponent % 2 == 0):
            raise ts.TpmFormatError(Reason.AIK_KEY_INVALID, "RSA parameters")
        return rsa.RSAPublicNumbers(aik.rsa_exponent, n).public_key()
    _, coord = ts.ECC_CURVES[aik.ecc_curve]
    if len(aik.ecc_x) > coord or len(aik.ecc_y) > coord:
        raise ts.TpmFormatError(Reason.AIK_KEY_INVALID, "ECC point size")
    point = b"\x04" + aik.ecc_x.rjust(coord, b"\0") + aik.ecc_y.rjust(coord, b"\0")
    return ec.EllipticCurvePublicKey.from_encoded_point(_CRYPTO_CURVES[aik.ecc_curve](), point)


def _signature_valid(key: Any, sig: ts.Signature, message: bytes) -> bool:
    """Check the TPM signature over the TPMS_ATTEST bytes with the scheme it names."""
    algorithm = _CRYPTO_HASHES[sig.hash_alg]()
    try:
        if sig.sig_alg == ts.ALG_ECDSA:
            if not isinstance(key, ec.EllipticCurvePublicKey):
                return False
            der = encode_dss_signature(sig.ecdsa_r, sig.ecdsa_s)
            key.verify(der, message, ec.ECDSA(algorithm))
            return True
        if not isinstance(key, rsa.RSAPublicKey):
            return False
        if sig.sig_alg == ts.ALG_RSASSA:
            key.verify(sig.rsa_signature, message, padding.PKCS1v15(), algorithm)
            return True
        # RSAPSS: TPMs use salt = digest length (TPM 2.0 spec, libtpms) or the maximum
        # (some firmware TPMs); accept exactly these two, nothing in between.
        em_len = (key.key_size - 1 + 7) // 8
        for salt in (algorithm.digest_size, em_len - algorithm.digest_size - 2):
            try:
                key.verify(sig.rsa_signature, message,
                           padding.PSS(padding.MGF1(algorithm), salt), algorithm)
                return True
            except InvalidSignature:
                continue
        return False
    except (InvalidSignature, ValueError):
        return False


class _Checks:
    """Mutable collector for one verification; frozen into an `AttestationResult` at the end."""

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.values: dict[str, Any] = {}

    def fail(self, reason: str) -> None:
        if reason not in self.reasons:
            self.reasons.append(reason)

    def result(self, expected_requested: bool) -> AttestationResult:
        v = self.values
        checks_ok = all(v.get(k, False) for k in (
            "signature_valid", "aik_restricted_signing", "scheme_matches", "nonce_bound",
            "pcr_digest_matches"))
        if expected_requested:
            v.setdefault("expected_pcrs_match", False)
            checks_ok = checks_ok and v["expected_pcrs_match"]
        if checks_ok and not self.reasons:
            return AttestationResult(valid=True, reasons=[], **v)
        if not self.reasons:  # defensive: an invalid verdict always carries a reason
            self.fail(Reason.QUOTE_MALFORMED)
        v.pop("pcr_values", None)
        return AttestationResult(valid=False, reasons=list(self.reasons), **v)


def _verify(attestation: Mapping[str, Any], payload_id: Any, expected_pcrs: Any,
            c: _Checks) -> None:
    if attestation.get("is_available") is not True:
        c.fail(Reason.NOT_AVAILABLE)
        return
    if (not isinstance(payload_id, str) or not payload_id
            or len(payload_id) > MAX_QUOTED_PAYLOAD_ID_CHARS):
        c.fail(Reason.PAYLOAD_ID_INVALID)
    raw = {}
    for key in ("quote_b64", "signature_b64", "aik_pubkey_b64"):
        try:
            raw[key] = _b64_field(attestation, key)
        except ts.TpmFormatError as exc:
            c.fail(exc.reason)
    if len(raw) != 3:
        return

    attest = _parse(ts.parse_attest, raw["quote_b64"], c)
    sig = _parse(ts.parse_signature, raw["signature_b64"], c)
    aik = _parse(ts.parse_public, raw["aik_pubkey_b64"], c)
    key = _check_aik(aik, c) if aik is not None else None
    if sig is not None:
        _check_signature(sig, aik, key, raw["quote_b64"], c)
    if attest is None:
        return
    c.values.update(
        qualified_signer=attest.qualified_signer.hex(),
        firmware_version=attest.firmware_version,
        clock_info={"clock": attest.clock, "reset_count": attest.reset_count,
                    "restart_count": attest.restart_count, "safe": int(attest.safe)},
    )
    if aik is not None and not _qualified_signer_consistent(attest.qualified_signer, aik):
        c.fail(Reason.QUALIFIED_SIGNER_INCONSISTENT)
    _check_nonce(attest.extra_data, payload_id, c)
    if sig is not None:
        _check_pcrs(attest, sig.hash_alg, attestation, expected_pcrs, c)


def _check_aik(aik: ts.PublicKey, c: _Checks) -> Any:
    """Attributes of the AIK; returns its `cryptography` key, or None when unusable."""
    c.values["aik_name"] = aik.name.hex()
    c.values["aik_restricted_signing"] = aik.restricted_signing and aik.attestation_profile
    if not aik.restricted_signing:
        c.fail(Reason.AIK_NOT_RESTRICTED_SIGNING)
    elif not aik.attestation_profile:
        c.fail(Reason.AIK_ATTRIBUTES_INVALID)
    try:
        return _public_key(aik)
    except ts.TpmFormatError as exc:
        c.fail(exc.reason)
    except (ValueError, TypeError):
        c.fail(Reason.AIK_KEY_INVALID)
    return None


def _check_signature(sig: ts.Signature, aik: ts.PublicKey | None, key: Any, quote: bytes,
                     c: _Checks) -> None:
    """The AIK's scheme must be the signature's, and the signature must verify."""
    c.values["signature_scheme"] = (
        f"{ts.SIG_SCHEME_NAMES[sig.sig_alg]}-{ts.HASH_ALGS[sig.hash_alg][0]}")
    if aik is not None:
        matches = aik.scheme == sig.sig_alg and aik.scheme_hash == sig.hash_alg
        c.values["scheme_matches"] = matches
        if not matches:
            c.fail(Reason.AIK_SCHEME_MISMATCH)
    if key is not None:
        ok = _signature_valid(key, sig, quote)
        c.values["signature_valid"] = ok
        if not ok:
            c.fail(Reason.SIGNATURE_INVALID)


def _parse(parser: Callable[[bytes], Any], data: bytes, c: _Checks) -> Any:
    """Run one structure parser; a format error becomes a reason and None."""
    try:
        return parser(data)
    except ts.TpmFormatError as exc:
        c.fail(exc.reason)
        return None


def _qualified_signer_consistent(qualified_signer: bytes, aik: ts.PublicKey) -> bool:
    """The QN must be a digest of the AIK's nameAlg. Its value needs the parent's QN, which
    the block does not carry, so only its form can be checked here."""
    return qualified_signer[:2] == aik.name[:2] and len(qualified_signer) == len(aik.name)


def _check_nonce(extra_data: bytes, payload_id: Any, c: _Checks) -> None:
    if not isinstance(payload_id, str) or Reason.PAYLOAD_ID_INVALID in c.reasons:
        return
    try:
        raw = payload_id.encode("utf-8")
    except UnicodeEncodeError:
        c.fail(Reason.PAYLOAD_ID_INVALID)
        return
    if hmac.compare_digest(extra_data, raw):
        c.values.update(nonce_bound=True, binding="raw")
    elif hmac.compare_digest(extra_data, hashlib.sha256(raw).digest()):
        c.values.update(nonce_bound=True, binding="sha256")
    else:
        c.fail(Reason.NONCE_MISMATCH)


def _check_pcrs(attest: ts.Attest, hash_alg: int, attestation: Mapping[str, Any],
                expected_pcrs: Any, c: _Checks) -> None:
    try:
        claimed = parse_pcr_banks(attestation.get("pcr_banks"))
    except ts.TpmFormatError as exc:
        c.fail(exc.reason)
        return
    if claimed != attest.pcr_selections:
        c.fail(Reason.PCR_SELECTION_MISMATCH)
        return
    try:
        values, quoted = _pcr_values(attestation.get("pcr_values"), attest.pcr_selections)
    except ts.TpmFormatError as exc:
        c.fail(exc.reason)
        return
    # pcrDigest = H_sign(concatenation of the selected values, bank by bank, ascending index)
    digest = hashlib.new(ts.HASH_ALGS[hash_alg][0], b"".join(values)).digest()
    if not hmac.compare_digest(digest, attest.pcr_digest):
        c.fail(Reason.PCR_DIGEST_MISMATCH)
        return
    c.values.update(pcr_digest_matches=True, pcr_values=quoted)
    if expected_pcrs is not None:
        _check_expected(quoted, expected_pcrs, c)


def _check_expected(quoted: dict[str, dict[str, str]], expected_pcrs: Any, c: _Checks) -> None:
    try:
        expected = _normalise_expected(expected_pcrs)
    except ts.TpmFormatError as exc:
        c.fail(exc.reason)
        return
    for bank, values in expected.items():
        for index, digest in values.items():
            have = quoted.get(bank, {}).get(str(index))
            if have is None or not hmac.compare_digest(bytes.fromhex(have), digest):
                c.values["expected_pcrs_match"] = False
                c.fail(Reason.EXPECTED_PCRS_MISMATCH)
                return
    c.values["expected_pcrs_match"] = True


def verify_tpm_attestation(attestation: dict, payload_id: str, *,
                           expected_pcrs: Mapping[str, Mapping[Any, str]] | None = None
                           ) -> AttestationResult:
    """Verify a `tpm_attestation` block for `payload_id`; optionally pin PCR values.

    `expected_pcrs` is `{bank: {index: hex}}` (e.g. `{"sha256": {0: "18cb..."}}`); every
    listed PCR must be in the quote with that value. Raises `TypeError` only when
    `attestation` is not a dict; everything else yields a result with `reasons`.
    """
    if not isinstance(attestation, dict):
        raise TypeError("attestation must be a dict (the _metadata.tpm_attestation block)")
    checks = _Checks()
    try:
        _verify(attestation, payload_id, expected_pcrs, checks)
    except Exception:  # last line of defence: malformed input must never escape
        log.exception("unexpected error while verifying a TPM attestation")
        checks.fail(Reason.VERIFIER_ERROR)
    result = checks.result(expected_pcrs is not None)
    log.debug("TPM attestation verified: valid=%s reasons=%s", result.valid, result.reasons)
    return result
