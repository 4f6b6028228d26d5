"""The `nomyo` command: one module per subcommand, the parser in `main`."""
from __future__ import annotations

from nomyo.cli.main import main

__all__ = ["main"]
