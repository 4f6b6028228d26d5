"""Error lines of the client commands: the library's messages name Python arguments
(`allow_http=True`), a command's user needs its flags (`--allow-http`)."""
from __future__ import annotations

import os
import re

# Python argument (as the library's messages write it) -> the flag that sets it
_FLAGS = {
    "allow_http=True": "--allow-http",
    "server_key_fingerprint": "--server-key-fingerprint",
    "key_dir": "--key-dir",
    "key_password": "--key-password-env",
    "ca_bundle": "--ca-bundle",
}
_WORDS = re.compile("|".join(rf"\b{re.escape(name)}(?![\w=])" if not name.endswith("True")
                             else re.escape(name) for name in _FLAGS))


def error_line(command: str, err: BaseException) -> str:
    """`nomyo <command>: error: <Kind>: <message>`, with argument names turned into flags
    in the library's own messages (an endpoint's answer, an APIError, is left as it is)."""
    from nomyo.errors import APIError

    text = str(err)
    if not isinstance(err, APIError):
        text = _WORDS.sub(lambda m: _FLAGS[m.group(0)], text)
    return f"nomyo {command}: error: {type(err).__name__}: {text}"


def password_from_env(variable: str | None) -> str | None:
    """The password held in environment variable `variable` (None when no variable is named);
    ValueError when it is empty or unset. A password is never taken on the command line."""
    if variable is None:
        return None
    value = os.environ.get(variable)
    if not value:
        raise ValueError(f"${variable} is empty or not set")
    return value
