"""TPM 2.0 attestation: verify quotes in responses (client) and make them (server)."""
from __future__ import annotations

from nomyo.attestation.verify import AttestationResult, Reason, verify_tpm_attestation

__all__ = ["AttestationResult", "Reason", "verify_tpm_attestation"]
