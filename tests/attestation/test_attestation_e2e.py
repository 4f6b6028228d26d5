"""Issue 5, end to end: `nomyo serve --tpm` backed by swtpm, and a client that requires
a valid quote on every answer."""
from __future__ import annotations

import pytest

from nomyo import SecureChatCompletion, SecurityError
from nomyo.attestation import quote
from nomyo.server import start_background
from tests import tpm_fixtures

MESSAGES = [{"role": "user", "content": "attested hello"}]


@pytest.fixture(scope="module")
def tcti():
    with tpm_fixtures.running_swtpm() as address:
        yield address


@pytest.mark.slow
def test_required_attestation_passes_with_a_tpm_and_fails_without(tcti):
    with quote.TpmQuoter(tcti) as quoter, start_background(attestor=quoter) as attested, \
            start_background() as plain:
        with SecureChatCompletion(base_url=attested.url, allow_http=True,
                                  attestation="require") as client:
            for _ in range(3):
                answer = client.create_sync("m", MESSAGES)
                assert "attested hello" in answer["choices"][0]["message"]["content"]
                verdict = answer["_metadata"]["attestation_verification"]
                assert verdict["valid"] is True and verdict["reasons"] == []
            with pytest.raises(SecurityError) as refused:
                client.create_sync("m", MESSAGES, base_url=plain.url)
            assert "not_available" in str(refused.value)
