"""The published client's module path for the low-level class and its errors.

Code written for nomyo 0.2.x imports `from nomyo.SecureCompletionClient import ...`; this
keeps that working. New code: `from nomyo import SecureCompletionClient`.
"""
from nomyo.client.core import SecureCompletionClient
from nomyo.errors import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    ForbiddenError,
    InvalidRequestError,
    RateLimitError,
    SecurityError,
    ServerError,
    ServiceUnavailableError,
)

__all__ = [
    "APIConnectionError",
    "APIError",
    "AuthenticationError",
    "ForbiddenError",
    "InvalidRequestError",
    "RateLimitError",
    "SecureCompletionClient",
    "SecurityError",
    "ServerError",
    "ServiceUnavailableError",
]
