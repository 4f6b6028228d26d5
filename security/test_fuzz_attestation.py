"""10,000 random and mutated attestation blocks: no exception escapes the verifier, every
invalid result carries a reason, and nothing but an untouched real quote ever verifies."""
from __future__ import annotations

import base64
import json
import logging
import random
import time

import pytest

from nomyo.attestation import AttestationResult, Reason, verify_tpm_attestation
from nomyo.attestation import tpm_structures as ts
from tests.tpm_fixtures import BLOCK_KEYS, FIELDS, block_of, load_vectors

log = logging.getLogger(__name__)

SEED = 20261122
CASES = 10_000


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _mutate_bytes(rng: random.Random, data: bytes, donors: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:                       # flip bits
            buf[min(pos, len(buf) - 1)] ^= rng.randint(1, 255)
        elif op == 1:                             # insert bytes
            buf[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 2:                             # delete a run
            del buf[pos:pos + rng.randint(1, 16)]
        elif op == 3:                             # truncate
            del buf[pos:]
        elif op == 4 and len(buf) >= 2:           # rewrite a 16-bit size / alg field
            at = min(pos, len(buf) - 2)
            buf[at:at + 2] = rng.choice([0, 1, 0xFFFF, 0x8000, rng.randrange(1 << 16),
                                         len(buf), len(buf) - at]).to_bytes(2, "big")
        elif op == 5:                             # splice from another real structure
            donor = rng.choice(donors)
            start = rng.randrange(len(donor))
            buf[pos:pos] = donor[start:start + rng.randint(1, 40)]
        elif op == 6:                             # append garbage
            buf += rng.randbytes(rng.randint(1, 64))
        elif buf:                                 # overwrite with an interesting byte
            buf[min(pos, len(buf) - 1)] = rng.choice([0, 1, 0x7F, 0x80, 0xFF])
    return bytes(buf)


def _random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 2 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False, 0, -1, 2**70, 1.5, float("nan")])
    if kind == 2:
        return "".join(chr(rng.randrange(0x20, 0x2FF)) for _ in range(rng.randint(0, 40)))
    if kind == 3:
        return _b64(rng.randbytes(rng.randint(0, 600)))
    if kind == 4:
        return rng.randbytes(rng.randint(0, 20))
    if kind == 5:
        return rng.choice(["sha256:0,7,10", "sha1:0", "sha256:", ":", "+", "sha256:0,,7"])
    if kind == 6:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {str(_random_value(rng, depth + 1))[:8]: _random_value(rng, depth + 1)
            for _ in range(rng.randint(0, 3))}


def _case(rng: random.Random, vectors: list[dict], donors: list[bytes]) -> tuple[dict, object,
                                                                             object]:
    vector = rng.choice(vectors)
    block = block_of(vector)
    payload_id = vector["payload_id"]
    expected = None
    mode = rng.randrange(10)
    if mode <= 4:                                 # mutate one or more binary fields
        for field in rng.sample(FIELDS, rng.randint(1, 3)):
            block[field] = _b64(_mutate_bytes(rng, base64.b64decode(block[field]), donors))
    elif mode == 5:                               # random bytes in binary fields
        for field in FIELDS:
            block[field] = _b64(rng.randbytes(rng.choice([0, 1, 2, 10, 90, 149, 262, 282, 700])))
    elif mode == 6:                               # wrong types / values anywhere
        for key in rng.sample(BLOCK_KEYS, rng.randint(1, 3)):
            block[key] = _random_value(rng)
    elif mode == 7:                               # PCR reporting tampered
        bank = block["pcr_values"]["sha256"]
        index = rng.choice(list(bank))
        bank[index] = rng.choice(["", "00", bank[index].upper(), rng.randbytes(32).hex(),
                                  bank[index][:-1]])
        if rng.random() < 0.5:
            block["pcr_banks"] = rng.choice(["sha256:0,7", "sha256:0,7,10,11", "sha1:0,7,10",
                                             "sha256:0,7,10+sha384:1", "sha256:07,7,10"])
    elif mode == 8:                               # random keys / payload ids / expectations
        block = {k: _random_value(rng) for k in rng.sample(BLOCK_KEYS, rng.randint(0, 6))}
        if rng.random() < 0.7:
            block["is_available"] = True
        payload_id = _random_value(rng)
    else:                                         # valid block, hostile expected_pcrs
        expected = _random_value(rng)
        if rng.random() < 0.5:
            expected = {"sha256": {rng.choice([0, "7", 10, 24, -3]): _random_value(rng)}}
    return block, payload_id, expected


def test_ten_thousand_random_and_mutated_blocks_never_escape():
    vectors = list(load_vectors().values())
    donors = [base64.b64decode(v[f]) for v in vectors for f in FIELDS]
    originals = {(v["quote_b64"], v["signature_b64"]) for v in vectors}
    rng = random.Random(SEED)
    valid = 0
    start = time.perf_counter()
    for i in range(CASES):
        block, payload_id, expected = _case(rng, vectors, donors)
        try:
            result = verify_tpm_attestation(block, payload_id, expected_pcrs=expected)
        except Exception as exc:  # noqa: BLE001 - report the reproducible case, then fail
            pytest.fail(f"case {i} (seed {SEED}) raised {exc!r}: {json.dumps(block)[:500]}")
        assert isinstance(result, AttestationResult)
        if result.valid:
            valid += 1
            assert result.reasons == []
            assert (block["quote_b64"], block["signature_b64"]) in originals, i
        else:
            assert result.reasons and all(isinstance(r, str) for r in result.reasons), i
            # the catch-all is a safety net only: every input must fail on a named check
            assert Reason.VERIFIER_ERROR not in result.reasons, (i, json.dumps(block)[:500])
    elapsed = time.perf_counter() - start
    log.info("fuzz: %d blocks in %.2f s, %d valid (untouched quotes)", CASES, elapsed, valid)


def test_non_dict_blocks_raise_type_error_only():
    rng = random.Random(SEED + 1)
    for _ in range(200):
        value = _random_value(rng)
        if isinstance(value, dict):
            verify_tpm_attestation(value, "id")
            continue
        with pytest.raises(TypeError):
            verify_tpm_attestation(value, "id")


_PARSERS = {"quote_b64": ts.parse_attest, "signature_b64": ts.parse_signature,
            "aik_pubkey_b64": ts.parse_public}


@pytest.mark.parametrize("field", FIELDS)
def test_parsers_raise_only_their_format_error(field):
    """The structure parsers themselves (below the verifier's safety net) either parse or
    raise TpmFormatError with a known reason, for random and for mutated real bytes."""
    parser = _PARSERS[field]
    vectors = list(load_vectors().values())
    donors = [base64.b64decode(v[f]) for v in vectors for f in FIELDS]
    known = {v for k, v in vars(Reason).items() if k.isupper()}
    rng = random.Random(SEED + 2)
    for i in range(3000):
        if i % 3 == 0:
            data = rng.randbytes(rng.randint(0, 400))
        else:
            data = _mutate_bytes(rng, base64.b64decode(rng.choice(vectors)[field]), donors)
        try:
            parser(data)
        except ts.TpmFormatError as exc:
            assert exc.reason in known, (i, exc.reason)
