"""Running one chat or completions request: wait for a batch slot, prefill, pace the tokens of
its `n` choices, answer with one JSON body (streams: `streaming.py`), and inject the in-flight
faults.

Commit point: a streaming response sends status 200 and its headers right after admission
control, before the slot wait and prefill (as vLLM does); from then on every failure is
in-band. A gone client surfaces as `asyncio.CancelledError` (handler cancellation) or
`ConnectionResetError` (next write); either way the engine slot is released on the way out.
A shutdown (`abort.Shutdown`) or the `abort_after` fault ends the request as vLLM's abort does:
each unfinished choice gets `finish_reason: "abort"`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Sequence
from contextlib import aclosing, contextmanager
from dataclasses import dataclass

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.prompttokens import Tokenizes

from . import shapes
from .abort import Shutdown
from .config import FaultSpec, SimConfig
from .engine import Engine, QueueFull, Seq
from .errors import SimError
from .faults import Faults
from .metrics import SimMetrics
from .prefix_cache import PrefixCache
from .protocol import GenerationRequest
from .text import Logprob, Token, answer_token, decoded, prompt_logprobs, token_logprob

Wait = Callable[[Awaitable[None]], Awaitable[None]]
Step = list[Token]  # one engine step: the next token of every choice
FINISH_ABORT = "abort"
MALFORMED_EVENT = b"data: {not json\n\n"


@dataclass(frozen=True, slots=True)
class Sim:
    """Everything a request handler needs from its app."""

    config: SimConfig
    engine: Engine
    metrics: SimMetrics
    registry: CollectorRegistry
    prefix_caches: tuple[PrefixCache, ...]  # one per data-parallel rank
    shutdown: Shutdown
    turns: Iterator[int]  # the rank for each request that names none, in turn
    tokenizer: Tokenizes | None = None  # SimConfig.tokenizer, loaded


def overloaded() -> SimError:
    return SimError(503, "The server is overloaded: too many requests are queued. Retry later.")


async def forever() -> None:
    """Wait until cancelled (the client disconnects): a hung engine."""
    await asyncio.get_running_loop().create_future()


async def complete(
    request: web.Request, sim: Sim, gen: GenerationRequest, fault: FaultSpec, header: shapes.Header
) -> web.Response:
    with submitted(sim, gen) as seq:
        faults = Faults(fault)
        tokens: list[list[Token]] = [[] for _ in range(gen.n)]
        async with aclosing(decode(sim, gen, seq, fault, _plain_wait)) as steps:
            action = await _whole_fault(sim, faults, 0, request)
            if action is None:
                async for step in steps:
                    for token in step:
                        tokens[token.choice].append(token)
                    action = await _whole_fault(sim, faults, sum(map(len, tokens)), request)
                    if action is not None:
                        break
        if isinstance(action, web.Response):
            return action
        body = _body(gen, header, tokens)
        return web.Response(body=orjson.dumps(body), content_type="application/json")


async def decode(
    sim: Sim, gen: GenerationRequest, seq: Seq, fault: FaultSpec, wait: Wait
) -> AsyncGenerator[Step, None]:
    """Yield the request's engine steps at the pace of the latency model, recording metrics.

    Marks `seq` finished only after the consumer asked for the step after the last one; stops
    early, unfinished, when the worker shuts down. vLLM runs a request with `n` choices as `n`
    engine requests, so its metrics count each choice (the prompt too).
    """
    config, metrics, shutdown = sim.config, sim.metrics, sim.shutdown
    await wait(shutdown.until(seq.wait_admitted()))
    if shutdown.started:
        return
    metrics.observe_queue(gen.model, time.monotonic() - seq.arrival)
    metrics.observe_prompt(gen.model, gen.prompt_tokens * gen.n)
    prefill = config.prefill_seconds(gen.prompt_tokens - _prefix_cache_hit(sim, gen))
    await wait(shutdown.sleep(prefill + fault.slow_first_token))
    last = seq.arrival
    for i in range(gen.max_tokens):
        if i:
            await wait(shutdown.sleep(config.inter_token_seconds(sim.engine.num_running)))
        if shutdown.started:
            return
        seq.generated += gen.n
        now = time.monotonic()
        metrics.observe_tokens(gen.model, gen.n, now - last, first=i == 0)
        last = now
        yield [answer_token(gen.key, choice, gen.start + i) for choice in range(gen.n)]
    seq.finish_reason = gen.finish_reason
    metrics.observe_finish(gen.model, gen.finish_reason, time.monotonic() - seq.arrival, gen.n)


def _prefix_cache_hit(sim: Sim, gen: GenerationRequest) -> int:
    """Prompt tokens whose prefill the prefix cache saves; the prompt's blocks are cached now."""
    cache = sim.prefix_caches[gen.dp_rank]
    if not cache.enabled:
        return 0
    if gen.cache_ids:
        # Counted in the real tokenizer's tokens (what a gateway predicts); the prefill saved
        # is the same share of the simulator's own prompt.
        hit = cache.admit(gen.cache_ids, salt=gen.model)
        sim.metrics.observe_prefix_cache(gen.model, len(gen.cache_ids), hit, gen.dp_rank)
        return gen.prompt_tokens * hit // len(gen.cache_ids)
    hit = cache.admit(gen.prompt_ids, salt=gen.model)
    sim.metrics.observe_prefix_cache(gen.model, gen.prompt_tokens, hit, gen.dp_rank)
    return hit


def joined_text(tokens: Sequence[Token]) -> str:
    return "".join(token.text for token in tokens)


def ids_of(gen: GenerationRequest, tokens: Sequence[Token]) -> list[int] | None:
    return [token.id for token in tokens] if gen.return_token_ids else None


def logprobs_of(gen: GenerationRequest, tokens: Sequence[Token]) -> list[Logprob]:
    return [token_logprob(gen.key, token, gen.logprobs or 0) for token in tokens]


def echo_logprobs(gen: GenerationRequest) -> list[Logprob]:
    """The echoed prompt's tokens: its words when it was text, else the decoded ids."""
    words = gen.prompt_text.split()
    if len(words) == gen.prompt_tokens:
        texts = [words[0], *(" " + word for word in words[1:])]
    else:
        texts = [decoded(i) for i in gen.prompt_ids]
    return prompt_logprobs(gen.key, gen.prompt_ids, texts, gen.logprobs or 0)


def _body(gen: GenerationRequest, header: shapes.Header, tokens: list[list[Token]]) -> shapes.Json:
    """The non-streaming answer; a choice cut short (shutdown, `abort_after`) ends "abort"."""
    answers = [_answer(gen, choice, got) for choice, got in enumerate(tokens)]
    usage = shapes.usage(gen.prompt_tokens, sum(map(len, tokens)))
    if gen.kind == "chat":
        prompt_ids = gen.prompt_ids if gen.return_token_ids else None
        return shapes.chat_response(header, answers, usage, prompt_ids)
    return shapes.completion_response(header, answers, usage)


def _answer(gen: GenerationRequest, choice: int, tokens: list[Token]) -> shapes.Answer:
    finish = gen.finish_reason if len(tokens) == gen.max_tokens else FINISH_ABORT
    if gen.kind == "chat":
        logprobs = None
        if gen.logprobs is not None:
            logprobs = shapes.chat_logprobs(logprobs_of(gen, tokens), gen.logprobs)
        return shapes.Answer(choice, joined_text(tokens), finish, logprobs, ids_of(gen, tokens))
    text = gen.prompt_text if gen.echo else ""
    if not gen.echo_only:
        text += joined_text(tokens)
    entries = echo_logprobs(gen) if gen.echo else []
    if not gen.echo_only:
        entries += logprobs_of(gen, tokens)
    logprobs = prompt = None
    if gen.logprobs is not None:
        logprobs = shapes.completion_logprobs(entries, gen.logprobs, 0)
        if gen.echo:
            prompt = shapes.prompt_logprobs(echo_logprobs(gen), gen.logprobs)
    prompt_ids = gen.prompt_ids if gen.return_token_ids else None
    return shapes.Answer(choice, text, finish, logprobs, ids_of(gen, tokens), prompt, prompt_ids)


async def _whole_fault(
    sim: Sim, faults: Faults, sent: int, request: web.Request
) -> web.Response | str | None:
    """The non-streaming forms of the in-flight faults: a response that replaces the answer,
    "abort" to answer with what there is, or None to go on."""
    for name in faults.due(sent):
        if name == "malformed_after":
            return web.Response(body=MALFORMED_EVENT[6:-2], content_type="application/json")
        if name == "error_after":
            return generation_error(sent).response()
        if name == "cut_after":
            cut(request)
            return web.Response()  # never sent: the connection is already closing
        if name == "abort_after":
            return FINISH_ABORT
        if name == "stall_after":
            await sim.shutdown.forever()
    return None


def generation_error(sent: int) -> SimError:
    return SimError(500, f"Simulated generation error after {sent} tokens (fault error_after).")


def cut(request: web.Request) -> None:
    """Close the connection abruptly (no terminating chunk, no [DONE]); written data is flushed."""
    if request.transport is not None:
        request.transport.close()


async def _plain_wait(awaitable: Awaitable[None]) -> None:
    await awaitable


@contextmanager
def submitted(sim: Sim, gen: GenerationRequest) -> Iterator[Seq]:
    """Hand the request to the engine; admission control rejects it with a 503 before any
    response starts. The KV cache holds the prompt once and every choice's tokens."""
    try:
        with sim.engine.submit(gen.model, gen.prompt_tokens, gen.max_tokens * gen.n) as seq:
            yield seq
    except QueueFull:
        sim.metrics.observe_rejection(gen.model, "max_num_queued_reqs")
        raise overloaded() from None
