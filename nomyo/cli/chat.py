"""`nomyo chat`: one encrypted chat request, printed; without `--base-url` it starts the
embedded echo endpoint on loopback, so the round trip works with no network."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from nomyo.cli.messages import error_line, password_from_env
from nomyo.cli.parser import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from nomyo.protocol.constants import (
    DEFAULT_KEY_BITS,
    DEFAULT_TIMEOUT,
    GENERATE_KEY_BITS,
    SECURITY_TIERS,
)


def register(sub: Any) -> None:
    """Add `chat` to the command's subparsers."""
    chat = sub.add_parser("chat", help="send one encrypted chat request and print the answer")
    chat.add_argument("message", nargs="*", help="the user message (read from stdin when absent)")
    chat.add_argument("--base-url", help="endpoint URL; without it an embedded echo endpoint "
                      "is started on loopback")
    chat.add_argument("--model", default="nomyo-echo", help="model name (default: %(default)s)")
    chat.add_argument("--system", help="optional system message")
    chat.add_argument("--tier", choices=SECURITY_TIERS, help="security tier")
    chat.add_argument("--api-key-env", default="NOMYO_API_KEY", metavar="VAR",
                      help="environment variable holding the API key (default: %(default)s); "
                      "never pass a key on the command line")
    chat.add_argument("--allow-http", action="store_true",
                      help="allow plain HTTP (local development only)")
    chat.add_argument("--ca-bundle", help="CA bundle for a private certificate authority")
    chat.add_argument("--server-key-fingerprint", metavar="SHA256",
                      help="refuse any server key with another SHA-256 fingerprint")
    chat.add_argument("--key-dir", help="load/save the client key pair here (default: ephemeral)")
    chat.add_argument("--key-password-env", metavar="VAR",
                      help="password of the --key-dir private key (to load it, or to encrypt "
                      "a new one), from this environment variable")
    chat.add_argument("--key-size", type=int, choices=GENERATE_KEY_BITS, default=DEFAULT_KEY_BITS)
    chat.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                      help="seconds (default: %(default)s)")
    chat.add_argument("--max-retries", type=int, default=2)
    chat.add_argument("--show-metadata", action="store_true",
                      help="also print the response's _metadata as JSON")
    chat.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from nomyo.client import SecureChatCompletion
    from nomyo.errors import NomyoError

    text = " ".join(args.message) if args.message else sys.stdin.read().strip()
    if not text:
        print("nomyo chat: error: no message given (argument or stdin)", file=sys.stderr)
        return EXIT_USAGE
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    messages.append({"role": "user", "content": text})
    try:
        key_password = password_from_env(args.key_password_env)
    except ValueError as err:
        print(f"nomyo chat: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    server = None
    base_url, allow_http = args.base_url, args.allow_http
    if base_url is None:
        from nomyo.server import start_background

        server = start_background(host="127.0.0.1", port=0, backend="echo")
        base_url, allow_http = server.url, True
        print(f"nomyo chat: no --base-url, using the embedded echo endpoint at {base_url}",
              file=sys.stderr)
    try:
        with SecureChatCompletion(
            base_url=base_url, allow_http=allow_http, api_key=os.environ.get(args.api_key_env),
            key_dir=args.key_dir, key_password=key_password, max_retries=args.max_retries,
            timeout=args.timeout, key_size=args.key_size, ca_bundle=args.ca_bundle,
            server_key_fingerprint=args.server_key_fingerprint,
        ) as client:
            response = client.create_sync(args.model, messages, security_tier=args.tier)
    except (NomyoError, ValueError, OSError) as err:  # OSError: e.g. an unusable --key-dir
        print(error_line("chat", err), file=sys.stderr)
        return EXIT_FAILED
    finally:
        if server is not None:
            server.stop()
    _print_answer(response, args.show_metadata)
    return EXIT_OK


def _print_answer(response: dict[str, Any], show_metadata: bool) -> None:
    for choice in response.get("choices") or []:
        message = choice.get("message") or {}
        if message.get("content"):
            print(message["content"])
        if message.get("tool_calls"):
            print(json.dumps(message["tool_calls"], indent=2))
    if show_metadata:
        print(json.dumps({"_metadata": response.get("_metadata")}, indent=2, sort_keys=True))
