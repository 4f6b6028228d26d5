"""`nomyo keys`: generate a key pair into a directory; show the SHA-256 fingerprint of a key
file or of a server's key (the value to pin with --server-key-fingerprint)."""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any

from nomyo.cli.messages import error_line, password_from_env
from nomyo.cli.parser import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from nomyo.protocol.constants import DEFAULT_KEY_BITS, GENERATE_KEY_BITS


def register(sub: Any) -> None:
    """Add `keys generate` and `keys fingerprint` to the command's subparsers."""
    key_cmd = sub.add_parser("keys", help="make key pairs; show fingerprints for pinning")
    key_sub = key_cmd.add_subparsers(title="key commands", metavar="ACTION")
    generate = key_sub.add_parser("generate", help="generate a key pair into a directory")
    generate.add_argument("directory", help="where private_key.pem (0600) and public_key.pem go")
    generate.add_argument("--key-size", type=int, choices=GENERATE_KEY_BITS,
                          default=DEFAULT_KEY_BITS)
    generate.add_argument("--password-env", metavar="VAR",
                          help="encrypt the private key with the password in this variable")
    generate.add_argument("--force", action="store_true",
                          help="replace a key pair already in the directory (it is lost)")
    generate.set_defaults(run=run_generate)
    show = key_sub.add_parser("fingerprint",
                              help="SHA-256 fingerprint of a key file or of a server's key")
    source = show.add_mutually_exclusive_group(required=True)
    source.add_argument("pem", nargs="?", help="a public or private key PEM file")
    source.add_argument("--url", help="fetch the server key from this endpoint")
    show.add_argument("--allow-http", action="store_true", help="allow a plain HTTP --url")
    show.add_argument("--ca-bundle", help="CA bundle for a private certificate authority")
    show.add_argument("--password-env", metavar="VAR",
                      help="password of an encrypted private key file, from this variable")
    show.set_defaults(run=run_fingerprint)


def run_generate(args: argparse.Namespace) -> int:
    from nomyo.protocol.keys import PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, KeyPair

    existing = [name for name in (PRIVATE_KEY_FILE, PUBLIC_KEY_FILE)
                if os.path.lexists(os.path.join(args.directory, name))]
    if existing and not args.force:
        print(f"nomyo keys: error: {args.directory} already holds {' and '.join(existing)}; "
              "--force replaces them (the old private key is lost)", file=sys.stderr)
        return EXIT_FAILED
    try:
        password = password_from_env(args.password_env)
    except ValueError as err:
        print(f"nomyo keys: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with KeyPair.generate(args.key_size) as pair:
            path = pair.save(args.directory, password)
            print(f"{path}\nfingerprint {pair.fingerprint}")
    except OSError as err:
        print(error_line("keys", err), file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def run_fingerprint(args: argparse.Namespace) -> int:
    from nomyo.errors import NomyoError
    from nomyo.protocol import keys

    try:
        if args.url:
            from nomyo.client import SecureCompletionClient

            # the client's own server-key fetch: same URL checks, TLS settings and parsing
            with warnings.catch_warnings(record=True) as said:
                warnings.simplefilter("always")
                client = SecureCompletionClient(args.url, allow_http=args.allow_http,
                                                ca_bundle=args.ca_bundle)
            for warning in said:  # e.g. plain HTTP to another host: one line, no source
                print(f"nomyo keys: warning: {warning.message}", file=sys.stderr)
            with client:
                pem = client.fetch_server_public_key_sync()
            print(keys.fingerprint(pem))
            return EXIT_OK
        with open(args.pem, encoding="ascii") as f:
            header = f.readline()  # only the BEGIN line: a private key never enters a str
            if "PRIVATE KEY" not in header:
                print(keys.fingerprint(header + f.read()))
                return EXIT_OK
        with keys.KeyPair.load(args.pem, password_from_env(args.password_env)) as pair:
            print(pair.fingerprint)
    except (NomyoError, ValueError, OSError) as err:
        print(error_line("keys", err), file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


