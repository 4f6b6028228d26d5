"""The `nomyo` command: `chat` (one encrypted request), `doctor` (protection report for humans,
`--json` for machines, `--require` for health checks), `keys` (generate a pair, show the
fingerprint to pin) and `serve` (the self-hosted endpoint).

Heavy modules are imported by the command that needs them, so `nomyo doctor` in a container
health check loads only the secure-memory layer.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from nomyo.cli.parser import OneLineParser

EXIT_OK = 0
EXIT_FAILED = 1  # the request failed, or a required protection is missing
EXIT_USAGE = 2

# --require names: what must hold in the report, and how to obtain it when it does not.
REQUIREMENTS: dict[str, tuple[Callable[[dict[str, Any]], bool], str]] = {
    "mlock": (
        lambda r: bool(r.get("has_memory_locking")),
        "grant CAP_IPC_LOCK or raise RLIMIT_MEMLOCK "
        "(docker: --ulimit memlock=-1 or --cap-add IPC_LOCK)",
    ),
    "no-core-dumps": (
        lambda r: bool(r.get("core_dumps_disabled")),
        "set RLIMIT_CORE to 0 (ulimit -c 0, docker --ulimit core=0) or call nomyo.harden_process()",
    ),
    "dump-exclusion": (
        lambda r: bool(r.get("dump_excluded")),
        "needs the native helper and madvise(MADV_DONTDUMP) (Linux)",
    ),
    "not-dumpable": (
        lambda r: r.get("dumpable") is False,
        "call nomyo.harden_process() in the application (prctl PR_SET_DUMPABLE 0)",
    ),
    "native": (
        lambda r: r.get("backend") == "native",
        "reinstall nomyo so that its native helper is built",
    ),
    "guard-pages": (
        lambda r: bool(r.get("guard_pages")),
        "needs the native helper",
    ),
    "memfd-secret": (
        lambda r: r.get("allocator") == "memfd_secret",
        "needs Linux >= 5.14 booted with secretmem enabled and no seccomp block on memfd_secret",
    ),
    "full": (
        lambda r: r.get("protection_level") == "full",
        "memory locking and dump exclusion must both be in force",
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `nomyo` console script; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = _parser(serve_arguments=bool(args_list) and args_list[0] == "serve")
    args = parser.parse_args(args_list)
    if not getattr(args, "run", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return args.run(args)


def _parser(serve_arguments: bool) -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="nomyo", description="End-to-end encrypted LLM chat completions.")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    chat = sub.add_parser("chat", help="send one encrypted chat request and print the answer")
    chat.add_argument("message", nargs="*", help="the user message (read from stdin when absent)")
    chat.add_argument("--base-url", help="endpoint URL; without it an embedded echo endpoint "
                      "is started on loopback")
    chat.add_argument("--model", default="nomyo-echo", help="model name (default: %(default)s)")
    chat.add_argument("--system", help="optional system message")
    chat.add_argument("--tier", choices=("standard", "high", "maximum"), help="security tier")
    chat.add_argument("--api-key-env", default="NOMYO_API_KEY", metavar="VAR",
                      help="environment variable holding the API key (default: %(default)s); "
                      "never pass a key on the command line")
    chat.add_argument("--allow-http", action="store_true",
                      help="allow plain HTTP (local development only)")
    chat.add_argument("--ca-bundle", help="CA bundle for a private certificate authority")
    chat.add_argument("--server-key-fingerprint", metavar="SHA256",
                      help="refuse any server key with another SHA-256 fingerprint")
    chat.add_argument("--key-dir", help="load/save the client key pair here (default: ephemeral)")
    chat.add_argument("--key-size", type=int, choices=(2048, 4096), default=4096)
    chat.add_argument("--timeout", type=float, default=60.0, help="seconds (default: %(default)s)")
    chat.add_argument("--max-retries", type=int, default=2)
    chat.add_argument("--show-metadata", action="store_true",
                      help="also print the response's _metadata as JSON")
    chat.set_defaults(run=_run_chat)

    doctor = sub.add_parser("doctor", help="report the memory protections in force here")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.add_argument("--require", type=_requirement_list, default=[], metavar="LIST",
                        help="comma-separated protections that must be in force, else exit 1: "
                        + ", ".join(REQUIREMENTS))
    doctor.add_argument("--harden", action="store_true",
                        help="apply nomyo.harden_process() first, as an application would")
    doctor.set_defaults(run=_run_doctor)

    key_cmd = sub.add_parser("keys", help="make key pairs; show fingerprints for pinning")
    key_sub = key_cmd.add_subparsers(title="key commands", metavar="ACTION")
    generate = key_sub.add_parser("generate", help="generate a key pair into a directory")
    generate.add_argument("directory", help="where private_key.pem (0600) and public_key.pem go")
    generate.add_argument("--key-size", type=int, choices=(2048, 4096), default=4096)
    generate.add_argument("--password-env", metavar="VAR",
                          help="encrypt the private key with the password in this variable")
    generate.set_defaults(run=_run_keys_generate)
    show = key_sub.add_parser("fingerprint",
                              help="SHA-256 fingerprint of a key file or of a server's key")
    source = show.add_mutually_exclusive_group(required=True)
    source.add_argument("pem", nargs="?", help="a public or private key PEM file")
    source.add_argument("--url", help="fetch the server key from this endpoint")
    show.add_argument("--allow-http", action="store_true", help="allow a plain HTTP --url")
    show.add_argument("--ca-bundle", help="CA bundle for a private certificate authority")
    show.add_argument("--password-env", metavar="VAR",
                      help="password of an encrypted private key file, from this variable")
    show.set_defaults(run=_run_keys_fingerprint)

    serve = sub.add_parser("serve", help="run the self-hostable secure-completion endpoint")
    if serve_arguments:
        from nomyo.cli.serve import add_serve_arguments

        add_serve_arguments(serve)
    serve.set_defaults(run=_run_serve)
    return parser


def _requirement_list(text: str) -> list[str]:
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in REQUIREMENTS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown protection {', '.join(unknown)}; known: {', '.join(REQUIREMENTS)}")
    return names


# -- doctor ------------------------------------------------------------------------------------

def _run_doctor(args: argparse.Namespace) -> int:
    from nomyo.memory import get_memory_protection_info, harden_process

    report = harden_process() if args.harden else get_memory_protection_info()
    missing = [name for name in args.require if not REQUIREMENTS[name][0](report)]
    if args.json:
        out = dict(report)
        if args.require:
            out["required"] = list(args.require)
            out["missing"] = missing
        print(json.dumps(out, indent=2, sort_keys=True))
    else:
        print(_human_report(report))
        for name in args.require:
            state = "MISSING" if name in missing else "ok"
            print(f"require {name:<15} {state}")
    for name in missing:
        print(f"nomyo doctor: {name} is not in force: {REQUIREMENTS[name][1]}", file=sys.stderr)
    return EXIT_FAILED if missing else EXIT_OK


def _yes(value: Any) -> str:
    return {True: "yes", False: "no", None: "unknown"}.get(value, str(value))


def _size(value: Any) -> str:
    if value is None:
        return "unlimited"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:g} {unit}"
        value /= 1024
    return str(value)  # pragma: no cover


def _human_report(r: dict[str, Any]) -> str:
    rows = [
        ("protection level", r.get("protection_level")),
        ("backend", f"{r.get('backend')} ({r.get('allocator')} allocator)"),
        ("memory locking", (f"{_yes(r.get('has_memory_locking'))} (can lock: "
                            f"{_yes(r.get('can_lock'))}, RLIMIT_MEMLOCK "
                            f"{_size(r.get('memlock_limit'))}, "
                            f"locked now {_size(r.get('locked_bytes') or 0)})")),
        ("excluded from dumps", _yes(r.get("dump_excluded"))),
        ("core dumps disabled", (f"{_yes(r.get('core_dumps_disabled'))} (RLIMIT_CORE "
                                 f"{_size(r.get('core_limit'))}, "
                                 f"dumpable {_yes(r.get('dumpable'))})")),
        ("guard pages", _yes(r.get("guard_pages"))),
        ("fork protection", r.get("fork_protection") or "none"),
        ("fail-closed mode", _yes(r.get("fail_closed"))),
        ("platform", r.get("platform")),
    ]
    if r.get("fallback_reason"):
        rows.append(("fallback reason", r["fallback_reason"]))
    return "\n".join(f"{name:<20} {value}" for name, value in rows)


# -- chat --------------------------------------------------------------------------------------

def _run_chat(args: argparse.Namespace) -> int:
    from nomyo.client.facade import SecureChatCompletion
    from nomyo.errors import NomyoError

    text = " ".join(args.message) if args.message else sys.stdin.read().strip()
    if not text:
        print("nomyo chat: error: no message given (argument or stdin)", file=sys.stderr)
        return EXIT_USAGE
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    messages.append({"role": "user", "content": text})
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
            key_dir=args.key_dir, max_retries=args.max_retries, timeout=args.timeout,
            key_size=args.key_size, ca_bundle=args.ca_bundle,
            server_key_fingerprint=args.server_key_fingerprint,
        ) as client:
            response = client.create_sync(args.model, messages, security_tier=args.tier)
    except (NomyoError, ValueError, OSError) as err:  # OSError: e.g. an unusable --key-dir
        print(f"nomyo chat: error: {type(err).__name__}: {err}", file=sys.stderr)
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


# -- keys --------------------------------------------------------------------------------------

def _password(variable: str | None) -> str | None:
    if variable is None:
        return None
    value = os.environ.get(variable)
    if not value:
        raise ValueError(f"${variable} is empty or not set")
    return value


def _run_keys_generate(args: argparse.Namespace) -> int:
    from nomyo.protocol.keys import KeyPair

    try:
        password = _password(args.password_env)
    except ValueError as err:
        print(f"nomyo keys: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with KeyPair.generate(args.key_size) as pair:
            path = pair.save(args.directory, password)
            print(f"{path}\nfingerprint {pair.fingerprint}")
    except OSError as err:
        print(f"nomyo keys: error: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _run_keys_fingerprint(args: argparse.Namespace) -> int:
    from nomyo.errors import NomyoError
    from nomyo.protocol import keys

    try:
        if args.url:
            from nomyo.client.core import PUBLIC_KEY_PATH
            from nomyo.client.transport import Transport, require_secure_url

            url = args.url.rstrip("/")
            require_secure_url(url, args.allow_http)
            transport = Transport(verify=args.ca_bundle or True)
            try:
                pem = transport.get(url + PUBLIC_KEY_PATH).decode("ascii")
            finally:
                transport.close()
            print(keys.fingerprint(pem))
            return EXIT_OK
        with open(args.pem, encoding="ascii") as f:
            header = f.readline()  # only the BEGIN line: a private key never enters a str
            if "PRIVATE KEY" not in header:
                print(keys.fingerprint(header + f.read()))
                return EXIT_OK
        with keys.KeyPair.load(args.pem, _password(args.password_env)) as pair:
            print(pair.fingerprint)
    except (NomyoError, ValueError, OSError) as err:
        print(f"nomyo keys: error: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


# -- serve -------------------------------------------------------------------------------------

def _run_serve(args: argparse.Namespace) -> int:
    from nomyo.cli.serve import run_serve

    result = run_serve(args)
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
