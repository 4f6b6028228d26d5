"""What the server commands (`nomyo serve`, `nomyo proxy`) share: argument types, the bind
check, logging set-up and the one-line failure."""
from __future__ import annotations

import argparse
import logging
import math
import socket
import sys
from collections.abc import Callable
from typing import Any

from nomyo.cli.parser import EXIT_USAGE


def checked(convert: Callable[[str], Any], noun: str, valid: Callable[[Any], bool],
            rule: str) -> Callable[[str], Any]:
    """An argparse type: `convert` the text, then require `valid(value)`, else say `rule`."""
    def check(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"{rule}, got {text!r}")
        return value
    return check


positive_float = checked(float, "a number", lambda v: v > 0 and math.isfinite(v),
                         "must be a positive number")
port_number = checked(int, "a port number", lambda v: 0 <= v <= 65535, "port must be 0..65535")
positive_int = checked(int, "a whole number", lambda v: v > 0, "must be positive")


def bind_check(host: str, port: int) -> int:
    """Bind `host:port` once (port 0: pick a free port) and return the port; OSError if busy."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, port))
        return probe.getsockname()[1]


def configure_logging(level: str) -> None:
    """Log lines with time and logger name; `level` for the library's loggers."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("nomyo").setLevel(level)


def fail(command: str, err: object) -> int:
    """Print `nomyo <command>: error: <first line>` on stderr; returns the usage exit status."""
    message = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, OSError) and err.filename and err.strerror:
        message = f"{err.filename}: {err.strerror}"
    print(f"nomyo {command}: error: {message}", file=sys.stderr)
    return EXIT_USAGE
