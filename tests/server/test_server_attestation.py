"""`nomyo serve --tpm`: every response carries a TPM quote bound to its payload id (swtpm)."""

from __future__ import annotations

import signal

import pytest
import requests

from nomyo.attestation import quote
from nomyo.server import start_background
from tests import tpm_fixtures
from tests.server_fixtures import (
    COMPLETION,
    chat_request,
    completion_headers,
    keypair,
    kill_group,
    listening_url,
    open_response,
    seal_request,
    serve_process,
    vector_keys,
)


@pytest.fixture(scope="module")
def tcti():
    with tpm_fixtures.running_swtpm() as address:
        yield address


def _ask(url: str, server_pem: str, payload_id: str) -> dict:
    headers = completion_headers(vector_keys()["client_public_pem"], payload_id=payload_id)
    body = seal_request(chat_request("attest me"), server_pem)
    response = requests.post(url + COMPLETION, data=body, headers=headers, timeout=120)
    assert response.status_code == 200, response.text
    return open_response(response.content)[0]


@pytest.mark.slow
def test_responses_carry_a_verifiable_quote(tcti) -> None:
    from nomyo.attestation import verify_tpm_attestation

    quoter = quote.TpmQuoter(tcti, "sha256:0,7,10")
    with start_background(key=keypair("server"), attestor=quoter) as srv:
        for payload_id in ("6f1c2a4e-1d2b-4c1e-9a7e-d3b42c4e598a", "openai-compat-1-abc"):
            block = _ask(srv.url, srv.public_key_pem, payload_id)["_metadata"]["tpm_attestation"]
            assert block["is_available"] is True and block["pcr_banks"] == "sha256:0,7,10"
            result = verify_tpm_attestation(block, payload_id)
            assert result.valid, result.reasons
            assert not verify_tpm_attestation(block, payload_id + "x").valid


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_cli_tpm_flag(tcti, workers) -> None:
    from nomyo.attestation import verify_tpm_attestation

    proc = serve_process("--key-bits", "2048", "--tpm", tcti, "--workers", workers)
    try:
        url = listening_url(proc)
        pem = requests.get(url + "/pki/public_key", timeout=10).text
        for i in range(4):  # whichever worker answers, its quote verifies
            block = _ask(url, pem, f"cli-{i}")["_metadata"]["tpm_attestation"]
            assert verify_tpm_attestation(block, f"cli-{i}").valid
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    finally:
        kill_group(proc)
    assert proc.returncode == 0
