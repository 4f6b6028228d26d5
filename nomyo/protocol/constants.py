"""Protocol 1.0 facts, each defined once: paths, tiers, header names, key sizes, size limits,
default timeouts and the default PCR selection (docs/protocol.md). Client, server, CLI and
attestation import them from here."""
from __future__ import annotations

# -- endpoints ---------------------------------------------------------------------------------
PUBLIC_KEY_PATH = "/pki/public_key"
COMPLETION_PATH = "/v1/chat/secure_completion"

# -- request headers (HTTP names; servers compare them case-insensitively) ---------------------
PAYLOAD_ID_HEADER = "X-Payload-ID"
PUBLIC_KEY_HEADER = "X-Public-Key"
SECURITY_TIER_HEADER = "X-Security-Tier"
AUTHORIZATION_HEADER = "Authorization"
MAX_PAYLOAD_ID_CHARS = 256  # printable ASCII
MAX_PUBLIC_KEY_HEADER_CHARS = 16 * 1024  # percent-encoded PEM of an RSA key up to 16384 bits

# -- security tiers ----------------------------------------------------------------------------
SECURITY_TIERS = ("standard", "high", "maximum")
DEFAULT_SECURITY_TIER = "standard"  # what a server applies when a request names none

# -- RSA key sizes -----------------------------------------------------------------------------
DEFAULT_KEY_BITS = 4096
GENERATE_KEY_BITS = (2048, 4096)  # sizes new pairs are made in
MIN_KEY_BITS = 2048  # smaller keys are refused wherever a key is loaded

# -- package size limits -----------------------------------------------------------------------
MAX_PLAINTEXT_BYTES = 10 * 1024 * 1024
# Largest package that can carry MAX_PLAINTEXT_BYTES: base64 of plaintext + tag, an RSA-wrapped
# key of at most 16384 bits, and generous room for the JSON around them.
MAX_PACKAGE_BYTES = (MAX_PLAINTEXT_BYTES + 16 + 2) // 3 * 4 + 8192 + 4096

# -- timeouts (seconds) ------------------------------------------------------------------------
DEFAULT_TIMEOUT = 60.0  # a client's connect and read timeout per attempt
DEFAULT_BACKEND_TIMEOUT = 120.0  # a server's read timeout towards its LLM backend

# -- attestation -------------------------------------------------------------------------------
DEFAULT_PCRS = "sha256:0,7,10"  # the PCR selection a server quotes unless told otherwise
