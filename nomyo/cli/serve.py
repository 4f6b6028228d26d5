"""`nomyo serve`: argument definitions and the foreground runner (also `python -m nomyo.server`)."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
from typing import Any

from nomyo.cli.common import (
    bind_check,
    configure_logging,
    fail,
    port_number,
    positive_float,
    positive_int,
)
from nomyo.cli.parser import OneLineParser
from nomyo.errors import NomyoError
from nomyo.protocol.constants import (
    DEFAULT_BACKEND_TIMEOUT,
    DEFAULT_KEY_BITS,
    DEFAULT_PCRS,
    GENERATE_KEY_BITS,
)

KEY_PASSWORD_ENV = "NOMYO_KEY_PASSWORD"
DEFAULT_PORT = 12434
DEFAULT_MAX_CONNECTIONS = 4096


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `nomyo serve` options to `parser`."""
    net = parser.add_argument_group("listening")
    net.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 for all IPv4)",
    )
    net.add_argument(
        "--port",
        type=port_number,
        default=DEFAULT_PORT,
        help=f"TCP port (default {DEFAULT_PORT}; 0 picks a free one)",
    )
    net.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate chain")
    net.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    net.add_argument(
        "--header-timeout",
        type=positive_float,
        default=5.0,
        metavar="SECONDS",
        help="a request head, and keep-alive idling, must arrive within this (default 5)",
    )
    net.add_argument(
        "--body-timeout",
        type=positive_float,
        default=30.0,
        metavar="SECONDS",
        help="a request body must arrive within this in total (default 30)",
    )
    net.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        metavar="N",
        help="server processes sharing the port and key (default 1); a worker that dies is "
        "respawned",
    )
    net.add_argument(
        "--threads",
        type=positive_int,
        default=16,
        metavar="N",
        help="requests decrypted or waiting for the backend at once, per worker (default 16)",
    )
    net.add_argument(
        "--max-connections",
        type=positive_int,
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help=f"open connections per worker (default {DEFAULT_MAX_CONNECTIONS}); an idle one "
        "costs a few KB, no thread, and is closed after --header-timeout; more wait in the "
        "listen queue",
    )

    net.add_argument(
        "--client-address-header",
        metavar="NAME",
        help="behind a reverse proxy on this host: take the client address (access log, "
        "rate limits, login throttling) from this header, e.g. X-Real-IP; believed only "
        "from loopback peers",
    )

    inference = parser.add_argument_group("inference")
    inference.add_argument(
        "--backend",
        default="echo",
        metavar="echo|URL",
        help="'echo' (built in) or the base URL of an OpenAI-compatible "
        "server, with or without /v1, e.g. http://127.0.0.1:8000 (default echo)",
    )
    inference.add_argument(
        "--backend-timeout",
        type=positive_float,
        default=DEFAULT_BACKEND_TIMEOUT,
        metavar="SECONDS",
        help="total deadline of one backend call; when it passes the backend connection is "
        f"closed (default {DEFAULT_BACKEND_TIMEOUT:g})",
    )

    key = parser.add_argument_group("server key")
    key.add_argument(
        "--key-file",
        metavar="PEM",
        help=f"server private key (PEM); password from ${KEY_PASSWORD_ENV} if "
        "encrypted. Default: an ephemeral key generated at start",
    )
    key.add_argument(
        "--key-bits",
        type=int,
        choices=GENERATE_KEY_BITS,
        default=DEFAULT_KEY_BITS,
        help=f"size of the ephemeral key (default {DEFAULT_KEY_BITS})",
    )

    policy = parser.add_argument_group("policy")
    policy.add_argument(
        "--api-key-file",
        metavar="FILE",
        help="require 'Authorization: Bearer <key>', one accepted key per line",
    )
    policy.add_argument(
        "--tier-policy",
        metavar="FILE",
        help='JSON {"model": ["standard", "high"], "*": [...]}: tiers each '
        "model may be served at (403 otherwise)",
    )
    policy.add_argument(
        "--rate-limit",
        type=positive_float,
        metavar="N",
        help="requests per second per API key (or client address)",
    )
    policy.add_argument(
        "--max-request-bytes",
        type=positive_int,
        metavar="BYTES",
        help="largest request body accepted (413 above; default fits 10 MiB of plaintext)",
    )

    tpm = parser.add_argument_group("attestation")
    tpm.add_argument(
        "--tpm",
        metavar="TCTI",
        help="attach a TPM quote to every response, e.g. device:/dev/tpmrm0",
    )
    tpm.add_argument(
        "--tpm-pcrs",
        default=DEFAULT_PCRS,
        metavar="BANK:LIST",
        help=f"PCR selection quoted with --tpm (default {DEFAULT_PCRS})",
    )

    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (default INFO); plaintext and keys are never logged",
    )


def run_serve(args: argparse.Namespace) -> int:
    """Run the server in the foreground until SIGTERM/SIGINT; returns the exit status."""
    import ssl  # imported here, as the server is: `nomyo doctor` stays light

    from nomyo.memory import harden_process
    from nomyo.server import production
    from nomyo.server.asgi import AsgiApp
    from nomyo.server.factory import create_app

    configure_logging(args.log_level)
    if not production.available():
        return fail("serve", "nomyo serve runs on granian, which is not installed: "
                    "pip install 'nomyo[server]'")
    harden_process()  # no core dumps, not dumpable: before any key exists
    _raise_open_files_limit(args.max_connections * args.workers + 256)
    if (args.tls_cert is None) != (args.tls_key is None):
        return fail("serve", "--tls-cert and --tls-key go together")
    if args.tls_key:
        try:
            _check_tls_key(args.tls_key)
        except (ValueError, OSError) as err:
            return fail("serve", err)
    try:
        port = bind_check(args.host, args.port)  # a busy port is found before the key is made
    except OSError as err:
        return fail("serve", f"cannot listen on {args.host}:{args.port}: {err.strerror or err}")
    try:
        options: dict[str, Any] = {}
        if args.max_request_bytes is not None:
            options["max_request_bytes"] = args.max_request_bytes
        app = create_app(
            backend=args.backend,
            backend_timeout=args.backend_timeout,
            key_file=args.key_file,
            # taken out of the environment: not inherited by workers or backends' children
            key_password=os.environ.pop(KEY_PASSWORD_ENV, None) or None,
            key_bits=args.key_bits,
            api_key_file=args.api_key_file,
            tier_policy_file=args.tier_policy,
            rate_limit=args.rate_limit,
            attestor=_attestor(args.tpm, args.tpm_pcrs),
            **options,
        )
    except (NomyoError, ValueError, TypeError, OSError, ssl.SSLError) as err:
        return fail("serve", err)
    problem = getattr(app.backend, "ready", lambda: None)()
    if problem:
        logging.getLogger("nomyo.server").warning(
            "the backend does not answer yet (%s); /ready reports 503 until it does", problem)
    scheme = "https" if args.tls_cert else "http"
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"{scheme}://{host}:{port}"

    def ready() -> None:
        print(
            f"nomyo serve: listening on {url} (backend {app.backend.name}; key "
            f"SHA-256 {app.keypair.fingerprint}; {args.workers} worker(s))",
            flush=True,
        )

    try:
        production.serve(
            AsgiApp(app, body_timeout=args.body_timeout, threads=args.threads,
                    client_address_header=args.client_address_header),
            host=args.host,
            port=port,
            workers=args.workers,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            header_timeout_ms=max(1, min(60_000, int(args.header_timeout * 1000))),
            backpressure=args.max_connections,
            on_ready=ready,
        )
    finally:
        app.backend.close()
    print("nomyo serve: stopped", flush=True)
    return 0


def _check_tls_key(path: str) -> None:
    """granian reads PKCS#8 keys only; say so (and how to convert) instead of its traceback."""
    from nomyo.server.policy import check_private_file

    check_private_file(path)
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if not any(marker in head for marker in (b"-----BEGIN PRIVATE KEY-----",
                                             b"-----BEGIN ENCRYPTED PRIVATE KEY-----")):
        raise ValueError(
            f"{path}: --tls-key must be a PKCS#8 PEM key (BEGIN PRIVATE KEY); convert it with "
            f"openssl pkcs8 -topk8 -nocrypt -in {shlex.quote(path)} -out key.pk8.pem"
        )


def _raise_open_files_limit(wanted: int) -> None:
    """Lift the soft RLIMIT_NOFILE towards `wanted` (up to the hard limit) for the connections."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    if min(soft, target) < wanted and resource.getrlimit(resource.RLIMIT_NOFILE)[0] < wanted:
        logging.getLogger("nomyo.server").warning(
            "open files limit %d is below --max-connections x --workers; raise `ulimit -n`",
            resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def _attestor(tcti: str | None, pcrs: str) -> Any:
    if not tcti:
        return None
    try:
        from nomyo.attestation.quote import TpmQuoter
    except ImportError:
        raise ValueError(
            "--tpm needs nomyo.attestation.quote, which this installation does not have"
        ) from None
    return TpmQuoter(tcti, pcrs)


_DESCRIPTION = (
    "Serve the NOMYO secure-completion protocol (1.0): clients encrypt prompts to this "
    "server's key; it decrypts them in secure memory, asks the backend, and encrypts the "
    "answer to the client's key."
)


def register(sub: Any) -> None:
    """Add `serve` to the `nomyo` command's subparsers."""
    serve = sub.add_parser("serve", help="run the self-hostable secure-completion endpoint",
                           description=_DESCRIPTION)
    add_serve_arguments(serve)
    serve.set_defaults(run=run_serve)


def main(argv: list[str] | None = None) -> int:
    """`python -m nomyo.server`: the same as `nomyo serve`."""
    parser = OneLineParser(prog="nomyo serve", description=_DESCRIPTION)
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))
