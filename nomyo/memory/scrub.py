"""Zero the strings of a parsed JSON tree once the server is done with it.

`secure_json.loads` leaves the decoded request as ordinary Python objects; after the answer is
sealed, the request and answer trees are emptied here and every string only they referenced is
zeroed in place (`wipe_str`), so no prompt or completion text lingers in freed heap memory.
Strings shared with anything else (interned names, cached one-character strings, values the
caller still holds) are refused by `wipe_str` and left alone: that refusal is the safety net.
"""

from __future__ import annotations

from typing import Any

from nomyo.memory import wipe_str


def wipe_tree(tree: Any) -> None:
    """Empty `tree` (nested dicts and lists) and zero each string it alone referenced."""
    # wipe_str accepts exactly one reference besides its argument: the local bound here. So
    # it is called inline, never through a helper (whose parameter would be a second one).
    stack = [tree]
    while stack:
        node = stack.pop()
        if not isinstance(node, (dict, list)):
            continue  # a bare scalar: nothing here is ours to empty
        while node:
            if isinstance(node, dict):
                key, value = node.popitem()
                if type(key) is str:
                    try:
                        wipe_str(key)
                    except ValueError:
                        pass  # shared (a memoised key, an interned name): not ours to zero
                del key
            else:
                value = node.pop()
            if type(value) is str:
                try:
                    wipe_str(value)
                except ValueError:
                    pass  # shared with someone else: not ours to zero
            elif isinstance(value, (dict, list)):
                stack.append(value)
            del value
        del node
