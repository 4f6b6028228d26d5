"""Zero the strings of a parsed JSON tree once the server is done with it.

`secure_json.loads` leaves the decoded request as ordinary Python objects; after the answer is
sealed, the request and answer trees are emptied here and every string only they referenced is
zeroed in place (`wipe_str_owned`), so no prompt or completion text lingers in freed heap
memory. Strings shared with anything else (interned names, values the caller still holds) are
refused by `wipe_str_owned` and left alone: that refusal is the safety net. The interpreter's
shared one-character strings are never written either.
"""

from __future__ import annotations

from typing import Any

from nomyo.errors import WipeRefusedError
from nomyo.memory import binding, wipe_str_owned


def wipe_tree(tree: Any) -> None:
    """Empty `tree` (nested dicts and lists) and zero each string it alone referenced."""
    # Each key and value is handed to wipe_str_owned in a list, this function's own name for
    # it deleted first: the list's reference must then be the object's only one.
    stack = [tree]
    while stack:
        node = stack.pop()
        if not isinstance(node, (dict, list)):
            continue  # a bare scalar: nothing here is ours to empty
        while node:
            if isinstance(node, dict):
                key, value = node.popitem()
                box = [key]
                del key
                if type(box[0]) is str:
                    _wipe_unless_shared(box)
            else:
                value = node.pop()
            box = [value]
            del value
            if type(box[0]) is str:
                _wipe_unless_shared(box)
            elif isinstance(box[0], (dict, list)):
                stack.append(box.pop())
            del box
        del node


def _refusing_quietly(box: list) -> bool:
    """The fallback's form of the native wipe_str_if_owned: a str shared with anyone else (a
    memoised key, an interned name) is not ours to zero and is left as it is."""
    try:
        return wipe_str_owned(box)
    except WipeRefusedError:
        return False


# The native form says "shared" with False rather than an exception: a tree's keys are
# mostly shared, and raising and catching for each was most of the cost of a wipe.
_wipe_unless_shared = (binding.pyobjects.wipe_str_if_owned if binding.pyobjects is not None
                       else _refusing_quietly)
