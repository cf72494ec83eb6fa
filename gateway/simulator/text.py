"""Deterministic text and token ids: which word is token i of an answer, which id each token
has, how a chat prompt's ids carry its answer's key, made-up logprobs, and embedding vectors.

Everything derives from blake2b over a canonical encoding, never from Python's per-process
randomised `hash()`, so two simulator processes answer the same request with the same text.
An answer is keyed by the conversation *without* a trailing assistant message (plus the seed):
continuing a partial answer therefore yields exactly the rest of the original answer.

Token ids live in disjoint ranges, so an id says what it is:

- `MARKER`: the generation prompt that ends a rendered chat (vLLM's template would put
  `<|assistant|>` there). It is followed by `KEY_IDS` ids carrying the answer key, 16 bits
  each (`KEY_BASE` + value). A chat prompt is `[role, words...]` per message, then that
  header, then the words of a final assistant message being continued.
- `ANSWER_BASE` + i: the answer word `WORDS[i]`.
- `PROMPT_BASE` + hash: any other word of a prompt, and role names.

So a completions prompt of token ids that contains a chat's header continues that chat's
answer at position len(prompt) - (end of the header): a gateway resumes a broken chat stream
on another worker by sending the chat's prompt ids followed by the answer ids it already sent.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

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

MARKER = 2
ANSWER_BASE = 100
PROMPT_BASE = 1_000
PROMPT_IDS = 1 << 20
KEY_BASE = 1 << 21
KEY_IDS = 8  # 16 bytes of answer key, 2 bytes per id
HEADER_LEN = 1 + KEY_IDS


@dataclass(frozen=True, slots=True)
class Token:
    """One generated token of one choice: its text (a word with a leading space) and id."""

    choice: int
    index: int  # position in the answer, counting a continued prefix
    text: str
    id: int


def answer_key(context: object, seed: int | None) -> bytes:
    """A digest of what determines an answer: a JSON-able context and the optional seed."""
    payload = orjson.dumps({"context": context, "seed": seed}, option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(payload, digest_size=16).digest()


def choice_key(key: bytes, choice: int) -> bytes:
    """The key of choice `choice` of an answer: choice 0 is the answer itself (as with n=1)."""
    if choice == 0:
        return key
    return hashlib.blake2b(choice.to_bytes(4, "big"), key=key, digest_size=16).digest()


def _word_index(key: bytes, index: int) -> int:
    digest = hashlib.blake2b(index.to_bytes(8, "big"), key=key, digest_size=8).digest()
    return int.from_bytes(digest, "big") % len(WORDS)


def token_text(key: bytes, index: int) -> str:
    """Token `index` (0-based) of the answer keyed by `key`: one word with a leading space."""
    return " " + WORDS[_word_index(key, index)]


def answer_token(key: bytes, choice: int, index: int) -> Token:
    """Token `index` of choice `choice` of the answer keyed by `key`."""
    word = _word_index(choice_key(key, choice), index)
    return Token(choice, index, " " + WORDS[word], ANSWER_BASE + word)


def count_tokens(text: str) -> int:
    """Tokens in a text, as the simulator counts them: whitespace-separated words."""
    return len(text.split())


def word_id(word: str) -> int:
    """The id of a prompt word (or a role name): stable across processes."""
    digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
    return PROMPT_BASE + int.from_bytes(digest, "big") % PROMPT_IDS


def text_ids(text: str) -> list[int]:
    return [word_id(word) for word in text.split()]


def decoded(token_id: int) -> str:
    """The text of one token id, as vLLM's detokenizer would give it."""
    if ANSWER_BASE <= token_id < ANSWER_BASE + len(WORDS):
        return " " + WORDS[token_id - ANSWER_BASE]
    return f" <{token_id}>"


def chat_header(key: bytes) -> list[int]:
    """The generation prompt that ends a chat prompt: `MARKER` and the answer key."""
    chunks = [int.from_bytes(key[i : i + 2], "big") for i in range(0, 2 * KEY_IDS, 2)]
    return [MARKER, *(KEY_BASE + chunk for chunk in chunks)]


def find_header(ids: Sequence[int]) -> tuple[bytes, int] | None:
    """The answer key of a chat whose prompt `ids` starts with, and where its header ends.

    The last `MARKER` followed by `KEY_IDS` key ids is the one: answer ids never equal it.
    """
    for at in range(len(ids) - HEADER_LEN, -1, -1):
        if ids[at] == MARKER and all(
            KEY_BASE <= x < KEY_BASE + (1 << 16) for x in ids[at + 1 : at + HEADER_LEN]
        ):
            key = b"".join((x - KEY_BASE).to_bytes(2, "big") for x in ids[at + 1 : at + HEADER_LEN])
            return key, at + HEADER_LEN
    return None


@dataclass(frozen=True, slots=True)
class Logprob:
    """One token's made-up log-probability and its alternatives (`top`: the token itself
    first, then others, each as (text, logprob, id)). A prompt's first token has none."""

    token: str
    id: int
    logprob: float | None
    top: tuple[tuple[str, float, int], ...]


def token_logprob(key: bytes, token: Token, alternatives: int) -> Logprob:
    """Stable logprobs for a generated token, with `alternatives` other candidates."""
    return _logprob(choice_key(key, token.choice), token.index, token.text, token.id, alternatives)


def prompt_logprobs(
    key: bytes, ids: Sequence[int], texts: Sequence[str], count: int
) -> list[Logprob]:
    """Logprobs of a prompt's tokens (echo): none for the first, which nothing predicts."""
    out = [Logprob(texts[0], ids[0], None, ())] if ids else []
    for at in range(1, len(ids)):
        out.append(_logprob(key, PROMPT_IDS + at, texts[at], ids[at], count))
    return out


def _logprob(key: bytes, index: int, text: str, token_id: int, count: int) -> Logprob:
    top = [(text, _made_up(key, index, 0), token_id)]
    start = _word_index(key, index ^ 0x5A5A)
    for step in range(len(WORDS)):
        if len(top) > count:
            break
        word = (start + step) % len(WORDS)
        if ANSWER_BASE + word != token_id:
            top.append((" " + WORDS[word], _made_up(key, index, len(top)), ANSWER_BASE + word))
    return Logprob(text, token_id, top[0][1], tuple(top))


def _made_up(key: bytes, index: int, rank: int) -> float:
    """A stable log-probability, lower for every later rank."""
    seed = key + index.to_bytes(8, "big") + rank.to_bytes(2, "big")
    return -round(_fraction(seed) * 3 + rank * 0.5, 6)


def embedding(item: str | Sequence[int], dim: int) -> list[float]:
    """A deterministic unit vector of `dim` floats for one embeddings input."""
    seed = hashlib.blake2b(orjson.dumps(item), digest_size=16).digest()
    raw = [_unit_float(seed, i) for i in range(dim)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


def _fraction(seed: bytes) -> float:
    digest = hashlib.blake2b(seed, digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _unit_float(seed: bytes, index: int) -> float:
    digest = hashlib.blake2b(index.to_bytes(4, "big"), key=seed, digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**63 - 1.0
