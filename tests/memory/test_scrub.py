"""wipe_tree: empties parsed JSON trees and never touches a string someone else still holds."""

from __future__ import annotations

import json

from nomyo.memory.scrub import wipe_tree


def test_empties_nested_trees_and_spares_shared_strings() -> None:
    tree = json.loads('{"a": "secret one", "b": ["secret two", {"c": "secret three"}], "n": 1}')
    kept_list, kept_dict = tree["b"], tree["b"][1]
    held = tree["a"]  # still referenced by us: must survive intact
    wipe_tree(tree)
    assert tree == {} and kept_list == [] and kept_dict == {}
    assert held == "secret one"
    shared = {"model": "gpt-x", "role": "user", "one": "x", "empty": ""}
    wipe_tree(shared)
    assert "gpt-x" == "gpt" + "-x" and "user".upper() == "USER"  # literals unharmed


def test_scalars_and_deep_trees() -> None:
    for scalar in ("text", 5, None, 1.5, True):
        wipe_tree(scalar)
    deep: list = []
    node = deep
    for _ in range(5000):  # deeper than recursion would allow
        node.append([])
        node = node[0]
    wipe_tree(deep)
    assert deep == []
