"""TPM 2.0 attestation: verify quotes in responses (client) and make them (server)."""
from __future__ import annotations

from nomyo.attestation.quote import AttestationError, TpmQuoter
from nomyo.attestation.verify import (
    AttestationResult,
    Reason,
    validate_expected_pcrs,
    verify_tpm_attestation,
)

__all__ = ["AttestationError", "AttestationResult", "Reason", "TpmQuoter",
           "validate_expected_pcrs", "verify_tpm_attestation"]
