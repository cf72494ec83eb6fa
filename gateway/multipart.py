"""Finding the ``model`` field of a ``multipart/form-data`` body as it arrives (sans-I/O).

Audio routes carry the model as a form field beside the file. The gateway routes on it without
buffering the body: it reads until the field's value is complete (the OpenAI SDK, like httpx,
sends plain fields before files, so that is the first few hundred bytes), then streams the
rest to the worker. A body with the field after the file is buffered up to the size limit.
"""

from __future__ import annotations

import re

_BOUNDARY = re.compile(r'boundary=(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)
# A value longer than this is not a model name.
MAX_VALUE = 1024
# Bytes kept between feeds: a part's headers and value split across reads are still found,
# and each feed searches only this much more than it was given.
_KEEP = 8192


def boundary_of(content_type: str) -> bytes | None:
    match = _BOUNDARY.search(content_type)
    if match is None:
        return None
    return (match.group(1) or match.group(2)).encode("latin-1")


class FieldFinder:
    """Feed the body's bytes; ``value`` is the field's value once its part is complete."""

    def __init__(self, boundary: bytes, name: str = "model") -> None:
        delimiter = re.escape(b"\r\n--" + boundary)
        quoted = re.escape(name.encode())
        self._part = re.compile(
            rb"(?:^|\r\n)--" + re.escape(boundary) + rb"\r\n"
            rb"(?:[^\r\n]+\r\n)*?"
            rb"content-disposition:[^\r\n]*;\s*name=\"?" + quoted + rb"\"?(?:;[^\r\n]*)?\r\n"
            rb"(?:[^\r\n]+\r\n)*\r\n"
            rb"(.{0," + str(MAX_VALUE).encode() + rb"}?)" + delimiter,
            re.IGNORECASE | re.DOTALL,
        )
        self._seen = bytearray()
        self.value: str | None = None

    def feed(self, chunk: bytes) -> bool:
        """True once the value is known."""
        if self.value is not None:
            return True
        self._seen += chunk
        match = self._part.search(self._seen)
        if match is None:
            del self._seen[:-_KEEP]
            return False
        self.value = match.group(1).decode("utf-8", errors="replace")
        self._seen = bytearray()
        return True
