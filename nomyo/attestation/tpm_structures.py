"""Bounded parsers for the TPM 2.0 structures carried by a quote (TPM 2.0 Part 2 layouts).

Every length is checked against the bytes left and against the structure's own maximum,
and trailing bytes are refused, so malformed input always ends in `TpmFormatError`.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

# TPM_ALG_ID values used here.
ALG_RSA = 0x0001
ALG_SHA1 = 0x0004
ALG_SHA256 = 0x000B
ALG_SHA384 = 0x000C
ALG_SHA512 = 0x000D
ALG_NULL = 0x0010
ALG_RSASSA = 0x0014
ALG_RSAPSS = 0x0016
ALG_ECDSA = 0x0018
ALG_ECC = 0x0023

# hash algorithm id -> (hashlib name, digest size)
HASH_ALGS: dict[int, tuple[str, int]] = {
    ALG_SHA1: ("sha1", 20),
    ALG_SHA256: ("sha256", 32),
    ALG_SHA384: ("sha384", 48),
    ALG_SHA512: ("sha512", 64),
}
HASH_IDS_BY_NAME = {name: alg for alg, (name, _) in HASH_ALGS.items()}
SIG_SCHEME_NAMES = {ALG_RSASSA: "rsassa", ALG_RSAPSS: "rsapss", ALG_ECDSA: "ecdsa"}

# TPM_ECC_CURVE -> (name, coordinate size in bytes)
ECC_CURVES: dict[int, tuple[str, int]] = {
    0x0003: ("secp256r1", 32),
    0x0004: ("secp384r1", 48),
    0x0005: ("secp521r1", 66),
}

TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_QUOTE = 0x8018

# TPMA_OBJECT bits
OBJ_FIXED_TPM = 1 << 1
OBJ_FIXED_PARENT = 1 << 4
OBJ_SENSITIVE_DATA_ORIGIN = 1 << 5
OBJ_USER_WITH_AUTH = 1 << 6
OBJ_NO_DA = 1 << 10
OBJ_RESTRICTED = 1 << 16
OBJ_DECRYPT = 1 << 17
OBJ_SIGN = 1 << 18
# The attestation-key template of tpm2-tools (tpm2_createak) and the TCG AK guidance: born in
# and bound to its TPM, restricted signing, password auth. Only noDA may vary (Windows sets it).
# Other object bits are refused: the quote does not bind the AIK's attributes (only its
# qualified name does, which needs the parent's), so a fixed profile keeps them honest.
AIK_REQUIRED_ATTRS = (OBJ_FIXED_TPM | OBJ_FIXED_PARENT | OBJ_SENSITIVE_DATA_ORIGIN
                      | OBJ_USER_WITH_AUTH | OBJ_RESTRICTED | OBJ_SIGN)
AIK_OPTIONAL_ATTRS = OBJ_NO_DA

MAX_DIGEST = 64            # sizeof(TPMU_HA)
MAX_NAME = 2 + MAX_DIGEST  # sizeof(TPMU_NAME) for object names
MAX_DATA = 2 + MAX_DIGEST  # TPM2B_DATA holds at most a TPMT_HA
MAX_RSA_BYTES = 512        # RSA-4096
MAX_ECC_BYTES = 66         # P-521
MAX_PCR_BANKS = 16
MAX_SIZEOF_SELECT = 4      # 32 PCRs; TPMs ship 24 (3 bytes)
MAX_PCR_INDEX = 8 * MAX_SIZEOF_SELECT


class TpmFormatError(ValueError):
    """A TPM structure is malformed; `reason` is a stable machine-readable code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


class _Reader:
    """Cursor over bytes that refuses to read past the end."""

    __slots__ = ("_data", "_pos", "_reason")

    def __init__(self, data: bytes, reason: str) -> None:
        self._data = data
        self._pos = 0
        self._reason = reason

    def take(self, n: int) -> bytes:
        if n > len(self._data) - self._pos:
            raise TpmFormatError(self._reason, "truncated")
        out = self._data[self._pos:self._pos + n]
        self._pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack(">Q", self.take(8))[0]

    def tpm2b(self, maximum: int, what: str) -> bytes:
        size = self.u16()
        if size > maximum:
            raise TpmFormatError(self._reason, f"{what} size {size} > {maximum}")
        return self.take(size)

    def hash_alg(self, what: str, allow_null: bool = False) -> int:
        alg = self.u16()
        if alg in HASH_ALGS or (allow_null and alg == ALG_NULL):
            return alg
        raise TpmFormatError(self._reason, f"unsupported {what} 0x{alg:04x}")

    def end(self) -> None:
        if self._pos != len(self._data):
            raise TpmFormatError(self._reason, "trailing bytes")


@dataclass(frozen=True)
class PcrSelection:
    """One TPMS_PCR_SELECTION: a hash bank and its selected PCR indices (ascending)."""

    hash_alg: int
    indices: tuple[int, ...]


@dataclass(frozen=True)
class Attest:
    """A parsed TPMS_ATTEST of type TPM_ST_ATTEST_QUOTE."""

    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    pcr_selections: tuple[PcrSelection, ...]
    pcr_digest: bytes


@dataclass(frozen=True)
class Signature:
    """A parsed TPMT_SIGNATURE: RSA signature bytes, or ECDSA (r, s) as integers."""

    sig_alg: int
    hash_alg: int
    rsa_signature: bytes = b""
    ecdsa_r: int = 0
    ecdsa_s: int = 0


@dataclass(frozen=True)
class PublicKey:
    """A parsed TPMT_PUBLIC of an RSA or ECC key (the parts a verifier needs)."""

    key_type: int
    name_alg: int
    object_attributes: int
    scheme: int
    scheme_hash: int | None
    rsa_modulus: bytes = b""
    rsa_exponent: int = 0
    rsa_key_bits: int = 0
    ecc_curve: int = 0
    ecc_x: bytes = b""
    ecc_y: bytes = b""
    name: bytes = b""  # nameAlg || H(TPMT_PUBLIC), the object's TPM Name

    @property
    def restricted_signing(self) -> bool:
        """True for a restricted signing key that cannot decrypt."""
        attrs = self.object_attributes
        return bool(attrs & OBJ_RESTRICTED and attrs & OBJ_SIGN and not attrs & OBJ_DECRYPT)

    @property
    def attestation_profile(self) -> bool:
        """True when the attributes are the attestation-key template: fixedTPM, fixedParent,
        sensitiveDataOrigin, userWithAuth, restricted, sign, optionally noDA, nothing else."""
        attrs = self.object_attributes
        return (attrs & AIK_REQUIRED_ATTRS == AIK_REQUIRED_ATTRS
                and not attrs & ~(AIK_REQUIRED_ATTRS | AIK_OPTIONAL_ATTRS))


def _pcr_select(r: _Reader) -> PcrSelection:
    alg = r.hash_alg("PCR bank")
    size = r.u8()
    if size > MAX_SIZEOF_SELECT:
        raise TpmFormatError("quote_malformed", f"sizeofSelect {size}")
    bitmap = r.take(size)
    indices = tuple(
        8 * byte_no + bit
        for byte_no, byte in enumerate(bitmap)
        for bit in range(8)
        if byte >> bit & 1
    )
    return PcrSelection(alg, indices)


def parse_pcr_selection_list(r: _Reader) -> tuple[PcrSelection, ...]:
    """TPML_PCR_SELECTION: count, then that many TPMS_PCR_SELECTION."""
    count = r.u32()
    if count > MAX_PCR_BANKS:
        raise TpmFormatError("quote_malformed", f"{count} PCR selections")
    return tuple(_pcr_select(r) for _ in range(count))


def parse_attest(data: bytes) -> Attest:
    """Parse a bare TPMS_ATTEST (what `tpm2_quote -m` writes) and require a quote."""
    r = _Reader(data, "quote_malformed")
    if r.u32() != TPM_GENERATED_VALUE:
        raise TpmFormatError("quote_wrong_magic")
    if r.u16() != TPM_ST_ATTEST_QUOTE:
        raise TpmFormatError("quote_wrong_type")
    qualified_signer = r.tpm2b(MAX_NAME, "qualifiedSigner")
    extra_data = r.tpm2b(MAX_DATA, "extraData")
    clock, reset_count, restart_count = r.u64(), r.u32(), r.u32()
    safe = r.u8()
    if safe > 1:
        raise TpmFormatError("quote_malformed", "clockInfo.safe not a TPMI_YES_NO")
    firmware_version = r.u64()
    selections = parse_pcr_selection_list(r)
    pcr_digest = r.tpm2b(MAX_DIGEST, "pcrDigest")
    r.end()
    return Attest(qualified_signer, extra_data, clock, reset_count, restart_count, bool(safe),
                  firmware_version, selections, pcr_digest)


def parse_signature(data: bytes) -> Signature:
    """Parse a TPMT_SIGNATURE without size prefix (what `tpm2_quote -s -f tss` writes)."""
    r = _Reader(data, "signature_malformed")
    sig_alg = r.u16()
    if sig_alg not in SIG_SCHEME_NAMES:
        raise TpmFormatError("signature_scheme_unsupported", f"0x{sig_alg:04x}")
    hash_alg = r.hash_alg("signature hash")
    if sig_alg == ALG_ECDSA:
        sig_r = r.tpm2b(MAX_ECC_BYTES, "ECDSA r")
        sig_s = r.tpm2b(MAX_ECC_BYTES, "ECDSA s")
        r.end()
        return Signature(sig_alg, hash_alg, ecdsa_r=int.from_bytes(sig_r, "big"),
                         ecdsa_s=int.from_bytes(sig_s, "big"))
    rsa_sig = r.tpm2b(MAX_RSA_BYTES, "RSA signature")
    r.end()
    return Signature(sig_alg, hash_alg, rsa_signature=rsa_sig)


def _no_sym_def(r: _Reader) -> None:
    """TPMT_SYM_DEF_OBJECT of a signing key: the TPM requires TPM_ALG_NULL."""
    if r.u16() != ALG_NULL:
        raise TpmFormatError("aik_malformed", "signing key with a symmetric algorithm")


def _scheme(r: _Reader, allowed: tuple[int, ...]) -> tuple[int, int | None]:
    """TPMT_RSA_SCHEME / TPMT_ECC_SCHEME for a signing key: scheme id and its hash."""
    scheme = r.u16()
    if scheme == ALG_NULL:
        return scheme, None
    if scheme not in allowed:
        raise TpmFormatError("aik_unsupported", f"key scheme 0x{scheme:04x}")
    return scheme, r.hash_alg("key scheme hash")


def parse_public(data: bytes) -> PublicKey:
    """Parse a TPM2B_PUBLIC (what `tpm2_create -u` writes) holding an RSA or ECC key."""
    outer = _Reader(data, "aik_malformed")
    body = outer.tpm2b(len(data), "TPM2B_PUBLIC")
    outer.end()
    r = _Reader(body, "aik_malformed")
    key_type = r.u16()
    if key_type not in (ALG_RSA, ALG_ECC):
        raise TpmFormatError("aik_unsupported", f"key type 0x{key_type:04x}")
    name_alg = r.hash_alg("nameAlg")
    name = struct.pack(">H", name_alg) + hashlib.new(HASH_ALGS[name_alg][0], body).digest()
    attrs = r.u32()
    r.tpm2b(MAX_DIGEST, "authPolicy")
    _no_sym_def(r)
    if key_type == ALG_RSA:
        scheme, scheme_hash = _scheme(r, (ALG_RSASSA, ALG_RSAPSS))
        key_bits = r.u16()
        exponent = r.u32() or 65537  # 0 means the default exponent
        modulus = r.tpm2b(MAX_RSA_BYTES, "RSA modulus")
        r.end()
        return PublicKey(key_type, name_alg, attrs, scheme, scheme_hash, rsa_modulus=modulus,
                         rsa_exponent=exponent, rsa_key_bits=key_bits, name=name)
    scheme, scheme_hash = _scheme(r, (ALG_ECDSA,))
    curve = r.u16()
    if curve not in ECC_CURVES:
        raise TpmFormatError("aik_unsupported", f"curve 0x{curve:04x}")
    if r.u16() != ALG_NULL:  # kdf scheme, then its hash
        r.hash_alg("kdf hash")
    x = r.tpm2b(MAX_ECC_BYTES, "ECC x")
    y = r.tpm2b(MAX_ECC_BYTES, "ECC y")
    r.end()
    return PublicKey(key_type, name_alg, attrs, scheme, scheme_hash, ecc_curve=curve,
                     ecc_x=x, ecc_y=y, name=name)
