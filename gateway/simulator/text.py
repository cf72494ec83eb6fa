"""Deterministic text: which word is token i of an answer, and which vector embeds an input.

Everything derives from blake2b over a canonical encoding, never from Python's per-process
randomised `hash()`, so two simulator processes answer the same request with the same text.
An answer is keyed by the conversation *without* a trailing assistant message (plus the seed):
continuing a partial answer therefore yields exactly the rest of the original answer.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import orjson

WORDS = (
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "a", "batch", "of",
    "tokens", "flows", "through", "gateway", "to", "worker", "and", "back", "again", "while",
    "cache", "fills", "with", "keys", "values", "model", "answers", "every", "request", "in",
    "order", "stream", "event", "server", "sends", "data", "client", "reads", "line", "by",
    "slot", "frees", "when", "done", "queue", "waits", "for", "its", "turn", "prefill", "decode",
    "latency", "grows", "slowly", "under", "load", "some", "words", "are", "short", "others",
    "longer", "than", "most",
)  # fmt: skip


def answer_key(context: object, seed: int | None) -> bytes:
    """A digest of what determines an answer: a JSON-able context and the optional seed."""
    payload = orjson.dumps({"context": context, "seed": seed}, option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(payload, digest_size=16).digest()


def token_text(key: bytes, index: int) -> str:
    """Token `index` (0-based) of the answer keyed by `key`: one word with a leading space."""
    digest = hashlib.blake2b(index.to_bytes(8, "big"), key=key, digest_size=8).digest()
    return " " + WORDS[int.from_bytes(digest, "big") % len(WORDS)]


def count_tokens(text: str) -> int:
    """Tokens in a text, as the simulator counts them: whitespace-separated words."""
    return len(text.split())


def embedding(item: str | Sequence[int], dim: int) -> list[float]:
    """A deterministic unit vector of `dim` floats for one embeddings input."""
    seed = hashlib.blake2b(orjson.dumps(item), digest_size=16).digest()
    raw = [_unit_float(seed, i) for i in range(dim)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


def _unit_float(seed: bytes, index: int) -> float:
    digest = hashlib.blake2b(index.to_bytes(4, "big"), key=seed, digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**63 - 1.0
