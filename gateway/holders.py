"""Which worker holds a stored Responses API answer.

vLLM keeps a stored response (``store: true``) in the memory of the server that made it, so a
``GET /v1/responses/{id}``, a cancel, or a new request naming it as ``previous_response_id``
must reach that server. The gateway remembers ``id -> worker URL`` for the answers it relayed,
in a bounded map (the oldest forgotten first). An id it does not know (another gateway process
or replica relayed it, or it was forgotten) is looked for on the workers themselves.
"""

from __future__ import annotations

import re
from collections import OrderedDict

# The first ``"id": "resp_..."`` of an answer: the response object's own id comes first in
# vLLM's JSON body and in its first stream event (``response.created``).
_ID = re.compile(rb'"id"\s*:\s*"(resp_[A-Za-z0-9_\-]{1,200})"')
DEFAULT_CAPACITY = 100_000


class ResponseHolders:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._capacity = capacity
        self._by_id: OrderedDict[str, str] = OrderedDict()

    def remember(self, response_id: str, worker_url: str) -> None:
        self._by_id[response_id] = worker_url
        self._by_id.move_to_end(response_id)
        while len(self._by_id) > self._capacity:
            self._by_id.popitem(last=False)

    def holder(self, response_id: str) -> str | None:
        return self._by_id.get(response_id)

    def forget(self, response_id: str) -> None:
        self._by_id.pop(response_id, None)

    def __len__(self) -> int:
        return len(self._by_id)


def response_id_in(data: bytes) -> str | None:
    """The response id at the start of an answer (JSON body or first stream events)."""
    match = _ID.search(data)
    return match.group(1).decode() if match else None
