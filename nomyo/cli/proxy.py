"""`nomyo proxy`: an OpenAI-compatible endpoint on loopback that forwards every request end
to end encrypted through our client to a secure-completion endpoint (docs/openai.md)."""
from __future__ import annotations

import argparse
import os
from typing import Any

from nomyo.cli.common import bind_check, configure_logging, fail, port_number, positive_float
from nomyo.cli.messages import password_from_env
from nomyo.protocol.constants import (
    DEFAULT_KEY_BITS,
    DEFAULT_TIMEOUT,
    GENERATE_KEY_BITS,
    SECURITY_TIERS,
)

DEFAULT_PORT = 12435
# Requests served at once: each holds a thread while its body arrives and while it waits on
# the upstream; idle and slow-header connections hold none (granian keeps them).
DEFAULT_THREADS = 32


def register(sub: Any) -> None:
    """Add `proxy` to the command's subparsers."""
    proxy = sub.add_parser("proxy", help="serve the OpenAI API on loopback, forwarded end to "
                           "end encrypted", description=__doc__)
    proxy.add_argument("--upstream", required=True, metavar="URL",
                       help="the secure-completion endpoint, e.g. https://api.nomyo.ai")
    proxy.add_argument("--host", default="127.0.0.1",
                       help="listen address (default 127.0.0.1); any other needs "
                       "--allow-remote and --proxy-api-key-file")
    proxy.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                       help=f"TCP port (default {DEFAULT_PORT}; 0 picks a free one)")
    proxy.add_argument("--allow-remote", action="store_true",
                       help="allow a non-loopback --host (plaintext reaches the proxy: put TLS "
                       "in front)")
    proxy.add_argument("--proxy-api-key-file", metavar="FILE",
                       help="callers of the proxy must send 'Authorization: Bearer <key>', one "
                       "accepted key per line")
    proxy.add_argument("--api-key-env", default="NOMYO_API_KEY", metavar="VAR",
                       help="environment variable holding the upstream API key (default "
                       "%(default)s)")
    proxy.add_argument("--api-key-file", metavar="FILE",
                       help="file holding the upstream API key (instead of --api-key-env)")
    proxy.add_argument("--tier", choices=SECURITY_TIERS, help="security tier of every request")
    proxy.add_argument("--model", action="append", default=[], metavar="NAME",
                       help="a model GET /v1/models lists (repeatable)")
    proxy.add_argument("--allow-http", action="store_true",
                       help="allow a plain-HTTP --upstream (local development only)")
    proxy.add_argument("--ca-bundle", help="CA bundle for a private certificate authority")
    proxy.add_argument("--server-key-fingerprint", metavar="SHA256",
                       help="refuse any upstream key with another SHA-256 fingerprint")
    proxy.add_argument("--attestation", choices=("verify", "require"),
                       help="check the upstream's TPM quote (see docs/attestation.md)")
    proxy.add_argument("--key-dir", help="load/save the client key pair here (default: "
                       "ephemeral)")
    proxy.add_argument("--key-password-env", metavar="VAR",
                       help="password of the --key-dir private key, from this variable")
    proxy.add_argument("--key-size", type=int, choices=GENERATE_KEY_BITS,
                       default=DEFAULT_KEY_BITS,
                       help="bits of a generated client key pair (default %(default)s)")
    proxy.add_argument("--timeout", type=positive_float, default=DEFAULT_TIMEOUT,
                       help="upstream timeout in seconds (default %(default)s)")
    proxy.add_argument("--max-retries", type=int, default=2)
    proxy.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                       help="requests served at once (default %(default)s); each holds a "
                       "thread while its body arrives and while the upstream answers")
    proxy.add_argument("--require-secure-memory", action="store_true",
                       help="refuse to run without locked, dump-excluded memory")
    proxy.add_argument("--log-level", default="INFO",
                       choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    proxy.set_defaults(run=run)


def _upstream_key(args: argparse.Namespace) -> str | None:
    if args.api_key_file:
        from nomyo.server.policy import check_private_file

        check_private_file(args.api_key_file)
        with open(args.api_key_file, encoding="utf-8") as handle:
            return handle.read().strip() or None
    return os.environ.get(args.api_key_env) or None


def run(args: argparse.Namespace) -> int:
    """Run the proxy in the foreground until SIGTERM/SIGINT; returns the exit status."""
    from nomyo.errors import NomyoError
    from nomyo.memory import harden_process
    from nomyo.server import production

    configure_logging(args.log_level)
    if not production.available():
        return fail("proxy", "nomyo proxy runs on granian, which is not installed: "
                    "pip install 'nomyo[server]'")
    from nomyo.server.policy import is_loopback

    if not is_loopback(args.host):
        if not args.allow_remote:
            return fail("proxy", f"--host {args.host} is not loopback: add --allow-remote "
                        "(and --proxy-api-key-file)")
        if not args.proxy_api_key_file:
            return fail("proxy", "--allow-remote needs --proxy-api-key-file: a proxy reachable "
                        "from elsewhere must check its callers")
    if args.threads < 1:
        return fail("proxy", "--threads must be at least 1")
    harden_process()  # no core dumps, not dumpable: before any key or prompt exists
    try:
        # Imported here, before granian forks the worker: a worker that imported requests
        # itself was seen to hang on an import lock the fork had copied in the held state.
        from nomyo.client import SecureChatCompletion
        from nomyo.openai.gateway import Gateway
        from nomyo.openai.wsgi import ProxyApp
        from nomyo.server.policy import ApiKeys

        keys = ApiKeys.from_file(args.proxy_api_key_file) if args.proxy_api_key_file else None
        upstream_key = _upstream_key(args)
        key_password = password_from_env(args.key_password_env)
        port = bind_check(args.host, args.port)
    except (NomyoError, ValueError, OSError) as err:
        return fail("proxy", err)

    def make_client() -> Any:
        return SecureChatCompletion(
            base_url=args.upstream, allow_http=args.allow_http, api_key=upstream_key,
            key_dir=args.key_dir, key_size=args.key_size, key_password=key_password,
            max_retries=args.max_retries,
            timeout=args.timeout, ca_bundle=args.ca_bundle,
            server_key_fingerprint=args.server_key_fingerprint, attestation=args.attestation,
            require_secure_memory=args.require_secure_memory,
        )

    app = ProxyApp(Gateway(models=args.model, api_keys=keys), make_client,
                   security_tier=args.tier)
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host}:{port}/v1"

    def ready() -> None:
        print(f"nomyo proxy: listening on {url} (upstream {args.upstream})", flush=True)

    production.serve(app, host=args.host, port=port, workers=1, on_ready=ready,
                     wsgi_threads=args.threads, in_worker=app.start)
    print("nomyo proxy: stopped", flush=True)
    return 0

