"""When the in-flight faults of one request strike: after how many generated tokens, each once.

The thresholds count tokens of all choices together. A stream checks them after every engine
step, and flushes its buffered chunks at a threshold first (`boundary`), so a fault strikes after
exactly its number of tokens however many tokens share a chunk.
"""

from __future__ import annotations

from .config import FaultSpec

# The order faults due at the same count are applied in.
ORDER = ("malformed_after", "error_after", "cut_after", "abort_after", "stall_after")


class Faults:
    """The in-flight faults of `spec` not applied yet."""

    def __init__(self, spec: FaultSpec) -> None:
        self.spec = spec
        self._left = {name: value for name in ORDER if (value := getattr(spec, name)) is not None}

    def due(self, generated: int) -> list[str]:
        """The faults whose threshold `generated` tokens reach, now applied (in `ORDER`)."""
        names = [name for name, at in self._left.items() if generated >= at]
        for name in names:
            del self._left[name]
        return names

    def boundary(self, before: int, after: int) -> bool:
        """Whether a pending fault's threshold lies in `before` < t <= `after`."""
        return any(before < at <= after for at in self._left.values())
