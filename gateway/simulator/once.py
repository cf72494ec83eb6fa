"""Which request ids a `once` fault has already struck: the memory shared by a fleet's workers.

The gateway sends the same `X-Request-Id` on every attempt of a request and on a resumed
stream's continuation, so "the first request carrying this id" is the first attempt wherever it
lands. Workers in one process share a `Claims` object; workers in separate processes share a
directory (`--claims-dir`), where claiming an id is creating its file with `O_EXCL`, atomic
across processes.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path

# Ids remembered in memory at most; the oldest are forgotten first.
MAX_REMEMBERED = 100_000


class Claims:
    """First-come claims on request ids, in memory or in a directory shared by processes."""

    def __init__(self, directory: Path | None = None) -> None:
        self._directory = directory
        self._seen: OrderedDict[str, None] = OrderedDict()

    def claim(self, request_id: str) -> bool:
        """True for the first claim of `request_id` in this memory, False for every later one."""
        if self._directory is not None:
            return self._claim_file(request_id)
        if request_id in self._seen:
            return False
        self._seen[request_id] = None
        if len(self._seen) > MAX_REMEMBERED:
            self._seen.popitem(last=False)
        return True

    def _claim_file(self, request_id: str) -> bool:
        assert self._directory is not None
        name = hashlib.sha256(request_id.encode()).hexdigest()[:32]
        try:
            fd = os.open(self._directory / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            return False
        os.close(fd)
        return True
