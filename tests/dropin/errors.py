"""Every error status of the protocol raises its class with status_code and error_details.

The endpoint answers the POSTs of this script, in order, with the statuses in EXPECTED
(the harness arranges that); retries are disabled so each status is seen once.
"""
import asyncio
import os

from nomyo import (
    APIError,
    AuthenticationError,
    ForbiddenError,
    InvalidRequestError,
    RateLimitError,
    SecureChatCompletion,
    ServerError,
    ServiceUnavailableError,
)

EXPECTED = [
    (400, InvalidRequestError),
    (401, AuthenticationError),
    (403, ForbiddenError),
    (404, APIError),
    (429, RateLimitError),
    (500, ServerError),
    (502, APIError),
    (503, ServiceUnavailableError),
    (504, APIError),
]


async def main():
    client = SecureChatCompletion(base_url=os.environ["NOMYO_URL"], allow_http=True, max_retries=0)
    for status, cls in EXPECTED:
        try:
            await client.create(model="Qwen/Qwen3-0.6B",
                                messages=[{"role": "user", "content": "hi"}])
        except APIError as err:
            # isinstance: ours raises subclasses for 502 and 504 (BadGatewayError,
            # GatewayTimeoutError), which `except APIError` written for the published one catches
            assert isinstance(err, cls), (status, type(err))
            assert err.status_code == status, (status, err.status_code)
            assert err.error_details == {"detail": f"injected {status}"}, err.error_details
            print(status, type(err).__name__, err)
        else:
            raise AssertionError(f"status {status} did not raise")
    print("OK")


asyncio.run(main())
