"""The Responses API's stored responses (`store: true`), kept in memory so that a later request can continue
one (`previous_response_id`) and `GET` / `DELETE /v1/responses/{id}` find it, as OpenAI and vLLM (with its
store enabled) keep them. An LRU bounded by count and by bytes: each response is charged its JSON and the
text of its whole conversation (earlier turns included, though entries of one chain share those strings:
the bound is on at most that much memory). Touched from the event loop only, so it has no lock.

A response enters the store once it has finished; one still being made (streamed, or in the background) is the
app's until then (`responses._Live`).
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

__all__ = ["Item", "ResponseStore", "Stored"]


@dataclass(frozen=True)
class Item:
    """One item of a stored conversation, as `GET /v1/responses/{id}/input_items` lists it: a message, a
    `function_call` (the assistant's: `text` its arguments) or a `function_call_output` (role "tool": `text` the
    function's result)."""

    id: str
    role: str  # "user", "system", "developer", "assistant" or "tool"
    text: str
    type: str = "message"  # or "function_call", "function_call_output"
    call_id: str | None = None  # a function call's, and its output's
    name: str | None = None  # the function a call (and its output) is of
    size: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", len(self.text.encode()) + len(self.call_id or "") + len(self.name or ""))


@dataclass(frozen=True)
class Stored:
    """A finished response: its object's JSON (what the POST answered, or its last event carried), the
    conversation it answered (its input items, earlier turns' included; never its `instructions`, which
    OpenAI does not carry over) and its output: a message, or the function calls it made. A background
    response also keeps `ends`, the length of its output text after each of its stream's delta events, from
    which its events are made again for a stream resumed after it finished (`None`: not a background
    response), and, with its logprobs (which its body holds), `lp_ends`: how many of them after each delta
    event."""

    body: bytes
    items: tuple[Item, ...]
    output: tuple[Item, ...]
    ends: array[int] | None = None
    lp_ends: array[int] | None = None

    @property
    def background(self) -> bool:
        return self.ends is not None

    @property
    def size(self) -> int:
        ends = sum(a.itemsize * len(a) for a in (self.ends, self.lp_ends) if a is not None)
        return len(self.body) + sum(i.size for i in (*self.items, *self.output)) + ends


class ResponseStore:
    """At most `max_count` responses of at most `max_bytes` (`Stored.size`) together; the least recently
    stored or read goes first. A response larger than `max_bytes` alone is not kept."""

    def __init__(self, max_count: int, max_bytes: int) -> None:
        if max_count < 1 or max_bytes < 1:
            raise ValueError(f"a response store holds at least 1 response and 1 byte, got {max_count} and {max_bytes}")
        self.max_count, self.max_bytes = max_count, max_bytes
        self._kept: OrderedDict[str, tuple[Stored, int]] = OrderedDict()  # id -> (response, its size)
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._kept)

    def put(self, response_id: str, response: Stored) -> bool:
        size = response.size
        if size > self.max_bytes:
            return False
        self.pop(response_id)
        while self._kept and (len(self._kept) >= self.max_count or self.nbytes + size > self.max_bytes):
            _, (_, freed) = self._kept.popitem(last=False)
            self.nbytes -= freed
        self._kept[response_id] = (response, size)
        self.nbytes += size
        return True

    def get(self, response_id: str) -> Stored | None:
        kept = self._kept.get(response_id)
        if kept is None:
            return None
        self._kept.move_to_end(response_id)
        return kept[0]

    def pop(self, response_id: str) -> Stored | None:
        kept = self._kept.pop(response_id, None)
        if kept is None:
            return None
        self.nbytes -= kept[1]
        return kept[0]
