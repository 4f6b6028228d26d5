"""`SecureAnswer`: a chat completion kept in secure memory (`create(..., secure_response=True)`).

The decrypted JSON stays in the SecureBuffer it was decrypted into, which the answer owns. It
is read once by the native span reader (`secure_json.spans`: string values stay in the buffer
as offsets), so no secret text becomes a `str`. `content()`, `view()` and a tool call's
`arguments` are read-only memoryviews of secure memory: of the plaintext itself when the JSON
string has no escapes, else of a second secure buffer the answer owns, unescaped in C.
Non-secret metadata (id, model, usage, finish reasons, `_metadata`) is decoded into ordinary
values when asked; `to_dict()` builds the ordinary dict the default call returns, for callers
who accept that copy. `close()`, the end of a `with` block or garbage collection releases
every view handed out and wipes the buffers.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from nomyo.errors import AnswerFieldError, ConfigurationError, DisposedError, PackageError
from nomyo.memory import SecureBuffer, binding, secure_json

Path = tuple[str | int, ...]


def require_span_reader() -> None:
    """ConfigurationError unless the native helper, which reads an answer in place, is built."""
    if binding.pyobjects is None:
        raise ConfigurationError("secure_response=True needs the native helper "
                                 "(nomyo._pyobjects), which is not built in this install")


@dataclass(frozen=True)
class SecureToolCall:
    """One tool call of a secure answer: `arguments` is a read-only view of its JSON text in
    secure memory (released when the answer closes); id, type and name are ordinary values."""

    id: str | None
    type: str | None
    name: str | None
    arguments: memoryview | None

    def __repr__(self) -> str:
        size = "None" if self.arguments is None else f"<{self.arguments.nbytes} bytes>"
        return f"SecureToolCall(id={self.id!r}, name={self.name!r}, arguments={size})"


class SecureAnswer:
    """A chat completion whose text stays in secure memory until the caller asks otherwise.

    Owns `plaintext` (the decrypted JSON); `client_metadata` holds the fields the client adds
    to `_metadata` (payload id, encryption facts, an attestation verdict).
    """

    __slots__ = ("__weakref__", "_client_metadata", "_closed", "_lock", "_plaintext",
                 "_tree", "_unescaped", "_views")

    def __init__(self, plaintext: SecureBuffer, client_metadata: Mapping[str, Any]) -> None:
        self._plaintext = plaintext
        self._client_metadata = dict(client_metadata)
        self._unescaped: dict[secure_json.Span, SecureBuffer] = {}
        self._views: list[memoryview] = []
        self._lock = threading.RLock()
        self._closed = False
        try:
            self._tree = secure_json.spans(plaintext)
            if not isinstance(self._tree, dict):
                raise PackageError("decrypted response is not a JSON object")
        except BaseException:
            self.close()
            raise

    # -- secret text: read-only views of secure memory ------------------------------------

    def content(self, choice: int = 0) -> memoryview | None:
        """The UTF-8 text of choices[choice].message.content (None when it is null)."""
        return self.view("choices", choice, "message", "content")

    def view(self, *path: str | int) -> memoryview | None:
        """A read-only view of the UTF-8 text of the string at `path` (object keys and list
        indexes from the top, e.g. "choices", 0, "message", "reasoning_content"); None when
        it is null. Released by close(); keep the answer alive while you use it."""
        with self._lock:
            node = self._node(path)
            if node is None:
                return None
            if type(node) is not tuple:
                raise AnswerFieldError(f"{_where(path)} is not a string")
            return self._text_view(node)

    def tool_calls(self, choice: int = 0) -> list[SecureToolCall]:
        """choices[choice].message.tool_calls, each call's arguments as a view; [] if none."""
        with self._lock:
            calls = self._node(("choices", choice, "message"))
            calls = calls.get("tool_calls") if isinstance(calls, dict) else None
            if calls is None:
                return []
            if not isinstance(calls, list):
                raise AnswerFieldError("tool_calls is not a list")
            out = []
            for i, call in enumerate(calls):
                path = ("choices", choice, "message", "tool_calls", i)
                if not isinstance(call, dict):
                    raise AnswerFieldError(f"{_where(path)} is not an object")
                function = call.get("function")
                function = function if isinstance(function, dict) else {}
                arguments = function.get("arguments")
                out.append(SecureToolCall(
                    id=self._ordinary_str(call.get("id"), (*path, "id")),
                    type=self._ordinary_str(call.get("type"), (*path, "type")),
                    name=self._ordinary_str(function.get("name"), (*path, "function", "name")),
                    arguments=self.view(*path, "function", "arguments")
                    if arguments is not None else None,
                ))
            return out

    # -- non-secret fields: ordinary values -----------------------------------------------

    @property
    def id(self) -> str | None:
        return self._top("id")

    @property
    def model(self) -> str | None:
        return self._top("model")

    @property
    def created(self) -> int | None:
        return self._top("created")

    @property
    def usage(self) -> dict[str, Any] | None:
        return self._top("usage")

    @property
    def choice_count(self) -> int:
        """How many choices the answer holds."""
        with self._lock:
            choices = self._node(()).get("choices")
            return len(choices) if isinstance(choices, list) else 0

    @property
    def metadata(self) -> dict[str, Any]:
        """`_metadata`: the server's fields and the client's, as the default call has them."""
        with self._lock:
            server = self._ordinary(self._node(()).get("_metadata"))
            merged = server if isinstance(server, dict) else {}
            merged.update(self._client_metadata)
            return merged

    def finish_reason(self, choice: int = 0) -> str | None:
        value = self._value(("choices", choice))
        return value.get("finish_reason") if isinstance(value, dict) else None

    def role(self, choice: int = 0) -> str | None:
        value = self._value(("choices", choice, "message"))
        return value.get("role") if isinstance(value, dict) else None

    def to_dict(self) -> dict[str, Any]:
        """The ordinary dict the default call returns: every string, the secret text too, is
        then a `str` on the heap that close() cannot wipe (see docs/client.md for wipe_str)."""
        with self._lock:
            self._check_open()
            response = secure_json.loads(self._plaintext)
            response["_metadata"] = self.metadata
            return response

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Release every view handed out and wipe the buffers; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            views, self._views = self._views, []
            buffers = [*self._unescaped.values(), self._plaintext]
            self._unescaped = {}
        for view in views:
            try:
                view.release()
            except BufferError:  # re-exported by the caller: the memory is wiped below,
                pass             # and unmapped once that export goes
        for buf in buffers:
            if not buf.closed:
                buf.close()

    def _note(self, **fields: Any) -> None:
        """Add client-side `_metadata` fields (the attestation verdict)."""
        with self._lock:
            self._client_metadata.update(fields)

    def __enter__(self) -> SecureAnswer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> SecureAnswer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()

    def __repr__(self) -> str:
        if self._closed:
            return "<SecureAnswer closed>"
        return f"<SecureAnswer id={self.id!r} choices={self.choice_count}>"

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("a SecureAnswer cannot be pickled; use to_dict() explicitly")

    def __copy__(self) -> Any:
        raise TypeError("a SecureAnswer cannot be copied")

    def __deepcopy__(self, memo: Any) -> Any:
        return self.__copy__()

    # -- internals ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise DisposedError("This secure answer has been closed")

    def _node(self, path: Path) -> Any:
        """The parsed node at `path` (spans for strings); AnswerFieldError when absent."""
        self._check_open()
        node = self._tree
        for i, step in enumerate(path):
            try:
                if isinstance(node, dict) and isinstance(step, str):
                    node = node[step]
                elif isinstance(node, list) and isinstance(step, int) and not isinstance(
                        step, bool):
                    node = node[step]
                else:
                    raise LookupError
            except LookupError:
                raise AnswerFieldError(f"the answer has no {_where(path[:i + 1])}") from None
        return node

    def _text_view(self, span: secure_json.Span) -> memoryview:
        start, end, size = span
        if size == end - start:  # no escapes: the text is the plaintext's own bytes
            source, lo, hi = self._plaintext, start, end
        else:
            source = self._unescaped.get(span)
            if source is None:
                source = self._unescaped[span] = secure_json.text_into(self._plaintext, span)
            lo, hi = 0, size
        with memoryview(source) as whole:
            view = whole[lo:hi].toreadonly()
        self._views.append(view)
        return view

    def _value(self, path: Path) -> Any:
        with self._lock:
            return self._ordinary(self._node(path), secret_message=True)

    def _top(self, name: str) -> Any:
        with self._lock:
            return self._ordinary(self._node(()).get(name))

    def _ordinary_str(self, node: Any, path: Path) -> str | None:
        value = self._ordinary(node)
        if value is not None and not isinstance(value, str):
            raise AnswerFieldError(f"{_where(path)} is not a string")
        return value

    def _ordinary(self, node: Any, secret_message: bool = False) -> Any:
        """`node` with its spans decoded into str (metadata only: never a message's text).
        `secret_message` leaves out what a choice's message holds besides its role."""
        if type(node) is tuple:
            start, end, _size = node
            with memoryview(self._plaintext) as whole:
                return secure_json.loads(whole[start - 1:end + 1])  # the quoted string
        if isinstance(node, dict):
            items: Iterator[tuple[str, Any]] = iter(node.items())
            if secret_message:
                items = ((k, v) for k, v in node.items() if k in _ORDINARY_OF_CHOICE)
            return {k: self._ordinary(v) for k, v in items}
        if isinstance(node, list):
            return [self._ordinary(v) for v in node]
        return node


# The fields of a choice, and of its message, read as ordinary values (finish_reason, role):
# the text, tool calls and logprobs (their tokens are pieces of the text) are left out.
_ORDINARY_OF_CHOICE = frozenset({"index", "finish_reason", "role"})


def _where(path: Path) -> str:
    return "".join(f"[{step!r}]" for step in path) or "answer"
