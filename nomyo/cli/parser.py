"""The argument parser of every `nomyo` command: bad flags give one line, not the usage."""
from __future__ import annotations

import argparse

EXIT_OK = 0
EXIT_FAILED = 1  # the request failed, or a required protection is missing
EXIT_USAGE = 2


class OneLineParser(argparse.ArgumentParser):
    """Bad flags give one line on stderr (and exit status 2), not the whole usage text;
    subcommand parsers made from it inherit the behaviour."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
