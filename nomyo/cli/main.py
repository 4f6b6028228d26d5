"""The `nomyo` command: `chat` (one encrypted request), `doctor` (protection report),
`keys` (make a pair, show fingerprints to pin) and `serve` (the self-hosted endpoint), one
module each.

Heavy modules are imported by the command that needs them, so `nomyo doctor` in a container
health check loads only the secure-memory layer.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from nomyo._version import __version__
from nomyo.cli import chat, doctor, keys, proxy, serve
from nomyo.cli.parser import EXIT_USAGE, OneLineParser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `nomyo` console script; returns the exit status."""
    parser = OneLineParser(prog="nomyo", description="End-to-end encrypted LLM chat completions.")
    parser.add_argument("--version", action="version", version=f"nomyo {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for command in (chat, doctor, keys, proxy, serve):
        command.register(sub)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if not getattr(args, "run", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return int(args.run(args) or 0)
