"""Where a resumed stream starts again when the cut fell inside a character.

vLLM's detokenizer holds back the tokens of a character it has only part of (a byte-level
token can carry the first bytes of a multi-byte character), so the client may have been sent
token ids whose text it has not seen. A continuation whose prompt ends in such a half
character makes vLLM's decoder (``tokenizers``' ``DecodeStream`` primed with the prompt) find
no clean boundary, and its first text is the whole prompt and answer decoded again: the
client would get the chat template and everything it already had. (Measured on vLLM 0.32: a
cut after 25 tokens of the tiny test model, with ``--stream-interval 3``.)

So before resuming, the gateway asks the worker that will continue (``/detokenize``, served by
every vLLM) whether the answer so far ends in a half character; if so, it steps back to the
last token that ends on a whole one. The continuation then writes the held-back tokens again
(greedy decoding gives the same ones) and the splice drops what the client already has of
them (``Transcript.roll_back``). A worker that cannot detokenize, or an answer whose text does
not line up, leaves the transcript as it was: the resume goes on as before.
"""

from __future__ import annotations

import asyncio
import logging

import orjson

from gateway.errors import UpstreamError
from gateway.resume import Transcript
from gateway.upstream import Upstream
from gateway.workers import Worker

log = logging.getLogger(__name__)

DETOKENIZE_PATH = "/detokenize"
REPLACEMENT = "\ufffd"  # what a decoder makes of a character it has only part of
# A UTF-8 character has at most 4 bytes, so at most 4 tokens end inside one.
MAX_STEPS_BACK = 4
TIME_LIMIT = 2.0  # seconds for all the questions together: a resume must not wait on them
BODY_LIMIT = 4 * 1024 * 1024


async def align(
    upstream: Upstream, worker: Worker, model: str, transcript: Transcript, headers: bytes
) -> None:
    """Roll ``transcript`` back to a whole character if its answer ends inside one."""
    prompt, answer = transcript.prompt_ids, transcript.ids
    if prompt is None or not answer:
        return
    try:
        async with asyncio.timeout(TIME_LIMIT):
            whole = await _decode(upstream, worker, model, prompt + answer, headers)
            if whole is None or not whole.endswith(REPLACEMENT):
                return
            head = await _decode(upstream, worker, model, prompt, headers)
            if head is None:
                return
            for keep in range(len(answer) - 1, max(len(answer) - MAX_STEPS_BACK, 0) - 1, -1):
                text = await _decode(upstream, worker, model, prompt + answer[:keep], headers)
                if text is None:
                    return
                if not text.endswith(REPLACEMENT):
                    if text.startswith(head) and transcript.roll_back(keep, text[len(head) :]):
                        log.info(
                            "resume starts %d tokens back, at a whole character",
                            len(answer) - keep,
                        )
                    return
    except (TimeoutError, UpstreamError):
        return


async def _decode(
    upstream: Upstream, worker: Worker, model: str, tokens: list[int], headers: bytes
) -> str | None:
    """The worker's text for ``tokens``; None when it does not say."""
    body = orjson.dumps({"model": model, "tokens": tokens})
    response = await upstream.send(worker, DETOKENIZE_PATH, body, headers)
    try:
        if response.status != 200:
            return None
        data = await upstream.read_body(response, BODY_LIMIT)
    finally:
        response.close()
    try:
        text = orjson.loads(data).get("prompt")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return text if isinstance(text, str) else None
