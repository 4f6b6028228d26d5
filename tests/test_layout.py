"""The layers import one way: facade -> client -> protocol -> memory; the server never uses
the client; the CLI sits on top. Read from the source with `ast`, so no import runs."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGE = Path(ROOT) / "nomyo"
FORBIDDEN = {
    "memory": ("nomyo.protocol", "nomyo.client", "nomyo.server", "nomyo.cli",
               "nomyo.attestation"),
    "protocol": ("nomyo.client", "nomyo.server", "nomyo.cli", "nomyo.attestation"),
    "attestation": ("nomyo.client", "nomyo.server", "nomyo.cli"),
    "client": ("nomyo.server", "nomyo.cli"),
    "openai": ("nomyo.cli",),
    "server": ("nomyo.client", "nomyo.cli"),
}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import"
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_layer_imports_upward(layer):
    # `python -m nomyo.server` is an entry point: its __main__ may start the CLI
    files = sorted(p for p in (PACKAGE / layer).rglob("*.py") if p.name != "__main__.py")
    assert files
    wrong = [f"{path.relative_to(ROOT)} imports {name}"
             for path in files for name in sorted(imported_modules(path))
             if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[layer])]
    assert wrong == []
