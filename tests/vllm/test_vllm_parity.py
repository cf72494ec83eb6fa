"""The simulator answers in real vLLM's shapes: the same requests to both, compared.

Each test sends one request to a simulated worker (in-process, model ``tiny``, vLLM's context
length) and to the real ``plain`` worker, and compares what no model text can change: status
codes and content types; every key of every event, recursively and in order, with its JSON
type (``shape``); the event sequence of a stream (role chunks, token chunks, finishing chunks,
usage chunk, ``[DONE]``: ``stream_form``); error ``type``/``param``/``code``; and the counts
and finish reasons that follow from vLLM's rules (clamping, defaults). Never the text.

vLLM varies how many tokens share a chunk, so consecutive token chunks of one choice that
have the same shape count as one, and token-id lists and logprob lists are compared by the
shapes of their items, not their lengths. Logprob dicts keyed by token text or id are maps:
their keys are data, so only their values' shapes count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.simulator import SimConfig
from tests.conftest import SimFactory
from tests.helpers import sse_data
from tests.vllm.conftest import VLLMFleet
from tests.vllm.fleet import MAX_MODEL_LEN, MODEL

pytestmark = pytest.mark.timeout(300)

TIMEOUT = aiohttp.ClientTimeout(total=60)
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "Tell me a story about a gateway"}]
USAGE = {"include_usage": True}
RUNNING_USAGE = {"include_usage": True, "continuous_usage_stats": True}
# A prompt of token ids both tokenizers accept (the tiny model's vocabulary has 2048).
LONG_IDS = [5] * 1000


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "temperature": 0, **fields}


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "A gateway is", "max_tokens": 4, "temperature": 0, **fields}


@dataclass(frozen=True)
class Answer:
    status: int
    content_type: str
    body: bytes


@dataclass(frozen=True)
class Case:
    """One request; `same` names values (dotted paths into a JSON body) that must be equal
    on both, beyond shapes: counts and finish reasons that vLLM's rules fix."""

    path: str
    body: dict[str, Any] | None = None
    same: tuple[str, ...] = field(default=())


async def ask(session: aiohttp.ClientSession, url: str, case: Case) -> Answer:
    if case.body is None:
        request = session.get(url + case.path, timeout=TIMEOUT)
    else:
        request = session.post(url + case.path, json=case.body, timeout=TIMEOUT)
    async with request as response:
        body = await response.read()
        return Answer(response.status, response.headers.get("Content-Type", ""), body)


async def both(vllm: VLLMFleet, sim: SimFactory, case: Case) -> tuple[Answer, Answer]:
    """(simulator, real vLLM) answers to one request."""
    return await ask_both(vllm, await simulator(sim), case)


async def simulator(sim: SimFactory) -> str:
    """A simulated worker that serves what the real one does: model and context length."""
    return (await sim(SimConfig(models=(MODEL,), max_model_len=MAX_MODEL_LEN))).url


async def ask_both(vllm: VLLMFleet, simulated: str, case: Case) -> tuple[Answer, Answer]:
    async with aiohttp.ClientSession() as session:
        return await ask(session, simulated, case), await ask(session, vllm.plain.url, case)


# --- shapes ---------------------------------------------------------------------------------

Path = tuple[str, ...]


def shape(value: Any, path: Path = ()) -> Any:
    """The keys (in order) and JSON types of a value, recursively; lists by the distinct
    shapes of their items in order of appearance; maps (`_is_map`) by their values' shapes."""
    if isinstance(value, dict):
        if _is_map(path):
            return ("map", _distinct(shape(v, (*path, "{}")) for v in value.values()))
        return [(k, shape(v, (*path, k))) for k, v in value.items()]
    if isinstance(value, list):
        return ("list", _distinct(shape(v, (*path, "[]")) for v in value))
    if value is None:
        return "null"
    return type(value).__name__  # bool, int, float, str


def _is_map(path: Path) -> bool:
    """Dicts keyed by data: completions' `top_logprobs` items (token -> logprob) and
    `prompt_logprobs` items (token id -> logprob record)."""
    return path[-3:] == ("logprobs", "top_logprobs", "[]") or path[-2:] == (
        "prompt_logprobs",
        "[]",
    )


def _distinct(shapes: Any) -> list[Any]:
    out: list[Any] = []
    for item in shapes:
        if item not in out:
            out.append(item)
    return out


def pick(body: Any, dotted: str) -> Any:
    """`choices.0.finish_reason` -> body["choices"][0]["finish_reason"]."""
    for part in dotted.split("."):
        body = body[int(part)] if isinstance(body, list) else body[part]
    return body


# --- streams --------------------------------------------------------------------------------


def kind(event: Any) -> str:
    if event == "[DONE]":
        return "done"
    if "error" in event:
        return "error"
    choices = event.get("choices") or []
    if not choices:
        return "usage"
    choice = choices[0]
    if choice.get("finish_reason") is not None:
        return f"finish:{choice['finish_reason']}"
    if "role" in (choice.get("delta") or {}):
        return "role"
    return "token"


def stream_form(raw: bytes) -> tuple[list[str], dict[Any, list[tuple[str, Any]]]]:
    """(the stream's kinds of events in order, with each run of token and finishing chunks
    as one "output": how the choices of n > 1 interleave is timing; per choice index, its
    events' kinds and shapes, consecutive token chunks of one shape as one)."""
    sequence: list[str] = []
    per_choice: dict[Any, list[tuple[str, Any]]] = {}
    for data in sse_data(raw):
        event: Any = data if data == "[DONE]" else orjson.loads(data)
        what = kind(event)
        coarse = "output" if what == "token" or what.startswith("finish:") else what
        if not (coarse == "output" and sequence and sequence[-1] == "output"):
            sequence.append(coarse)
        choices = event.get("choices") if isinstance(event, dict) else None
        index = choices[0]["index"] if choices else None
        entry = (what, "[DONE]" if event == "[DONE]" else shape(event))
        events = per_choice.setdefault(index, [])
        if not (what == "token" and events and events[-1] == entry):
            events.append(entry)
    return sequence, per_choice


def assert_same_stream(simulated: Answer, real: Answer) -> None:
    assert (simulated.status, simulated.content_type) == (real.status, real.content_type)
    sim_sequence, sim_choices = stream_form(simulated.body)
    real_sequence, real_choices = stream_form(real.body)
    assert sim_sequence == real_sequence
    assert sim_choices == real_choices
    assert sim_sequence[-1] == "done"


def assert_same_json(simulated: Answer, real: Answer, same: tuple[str, ...] = ()) -> None:
    assert (simulated.status, simulated.content_type) == (real.status, real.content_type)
    sim_body, real_body = orjson.loads(simulated.body), orjson.loads(real.body)
    assert shape(sim_body) == shape(real_body)
    for dotted in same:
        assert pick(sim_body, dotted) == pick(real_body, dotted), dotted


# --- the cases ------------------------------------------------------------------------------

STREAMS = {
    "chat": Case(CHAT, chat(stream=True)),
    "chat-usage": Case(CHAT, chat(stream=True, stream_options=USAGE)),
    "chat-usage-off": Case(CHAT, chat(stream=True, stream_options={"include_usage": False})),
    "chat-continuous-alone": Case(
        CHAT, chat(stream=True, stream_options={"continuous_usage_stats": True})
    ),
    "chat-continuous": Case(CHAT, chat(stream=True, stream_options=RUNNING_USAGE)),
    "chat-token-ids": Case(CHAT, chat(stream=True, return_token_ids=True, stream_options=USAGE)),
    "chat-n2": Case(CHAT, chat(stream=True, n=2, temperature=0.8, seed=7, stream_options=USAGE)),
    "chat-n2-no-usage": Case(CHAT, chat(stream=True, n=2, temperature=0.8, seed=7)),
    "chat-logprobs": Case(CHAT, chat(stream=True, logprobs=True, top_logprobs=2)),
    "chat-logprobs-no-top": Case(CHAT, chat(stream=True, logprobs=True)),
    "completion": Case(COMPLETIONS, completion(stream=True)),
    "completion-usage": Case(COMPLETIONS, completion(stream=True, stream_options=USAGE)),
    "completion-continuous": Case(
        COMPLETIONS, completion(stream=True, stream_options=RUNNING_USAGE)
    ),
    "completion-token-ids": Case(COMPLETIONS, completion(stream=True, return_token_ids=True)),
    "completion-ids-prompt": Case(
        COMPLETIONS, completion(stream=True, prompt=[5, 6, 7], return_token_ids=True)
    ),
    "completion-n2-logprobs": Case(
        COMPLETIONS, completion(stream=True, n=2, temperature=0.8, seed=7, logprobs=2)
    ),
    "completion-echo-logprobs": Case(COMPLETIONS, completion(stream=True, echo=True, logprobs=1)),
    "completion-echo-max0": Case(
        COMPLETIONS, completion(stream=True, echo=True, max_tokens=0, stream_options=USAGE)
    ),
}

BODIES = {
    "chat": Case(CHAT, chat(), ("choices.0.finish_reason", "object")),
    "chat-token-ids": Case(CHAT, chat(return_token_ids=True)),
    "chat-n2": Case(CHAT, chat(n=2, temperature=0.8, seed=7), ("usage.completion_tokens",)),
    "chat-logprobs": Case(CHAT, chat(logprobs=True, top_logprobs=2)),
    "completion": Case(COMPLETIONS, completion(), ("choices.0.finish_reason", "object")),
    "completion-token-ids": Case(COMPLETIONS, completion(return_token_ids=True)),
    "completion-n2-logprobs": Case(
        COMPLETIONS, completion(n=2, temperature=0.8, seed=7, logprobs=2)
    ),
    "completion-echo-logprobs": Case(COMPLETIONS, completion(echo=True, logprobs=1)),
    "completion-echo-max0": Case(
        COMPLETIONS,
        completion(echo=True, max_tokens=0, logprobs=1),
        ("usage.completion_tokens", "choices.0.finish_reason"),
    ),
    # A prompt plus max_tokens over the context is clamped to what is left, not refused.
    "completion-clamped": Case(
        COMPLETIONS,
        completion(prompt=LONG_IDS, max_tokens=100),
        ("usage.prompt_tokens", "usage.completion_tokens", "choices.0.finish_reason"),
    ),
}

ERRORS = {
    "chat-unknown-model": Case(CHAT, chat(model="no-such-model")),
    "chat-prompt-too-long": Case(
        CHAT, chat(messages=[{"role": "user", "content": "word " * 2000}])
    ),
    "completion-prompt-too-long": Case(COMPLETIONS, completion(prompt=[5] * 1100)),
    "completion-prompt-fills-context": Case(
        COMPLETIONS, completion(prompt=[5] * MAX_MODEL_LEN, max_tokens=None)
    ),
    "completion-max-tokens-over-context": Case(COMPLETIONS, completion(max_tokens=5000)),
    "chat-max-tokens-zero": Case(CHAT, chat(max_tokens=0)),
    "chat-stream-options-without-stream": Case(CHAT, chat(stream_options=USAGE)),
    "chat-no-messages": Case(CHAT, chat(messages=[])),
    "chat-n-over-vllm-limit": Case(CHAT, chat(n=20000, temperature=0.8)),
    "chat-stream-unknown-model": Case(CHAT, chat(model="no-such-model", stream=True)),
}


@pytest.mark.parametrize("name", list(STREAMS))
async def test_stream_shapes_equal_vllm(vllm: VLLMFleet, sim: SimFactory, name: str) -> None:
    """Asked up to three times: vLLM, falling behind under load, puts several tokens in one
    chunk, up to the whole answer in the finishing chunk (with the first chunk's extra keys,
    such as ``prompt_token_ids``), which no comparison of shapes can tell from a difference.
    A real difference fails every time."""
    for attempt in range(3):
        simulated, real = await both(vllm, sim, STREAMS[name])
        assert real.status == 200, real.body[:500]
        try:
            assert_same_stream(simulated, real)
            return
        except AssertionError:
            if attempt == 2:
                raise


@pytest.mark.parametrize("name", list(BODIES))
async def test_json_shapes_equal_vllm(vllm: VLLMFleet, sim: SimFactory, name: str) -> None:
    case = BODIES[name]
    simulated, real = await both(vllm, sim, case)
    assert real.status == 200, real.body[:500]
    assert_same_json(simulated, real, case.same)


@pytest.mark.parametrize("name", list(ERRORS))
async def test_errors_equal_vllm(vllm: VLLMFleet, sim: SimFactory, name: str) -> None:
    simulated, real = await both(vllm, sim, ERRORS[name])
    assert 400 <= real.status < 500, real.body[:500]
    assert_same_json(simulated, real, ("error.type", "error.param", "error.code"))


async def test_models_health_version_equal_vllm(vllm: VLLMFleet, sim: SimFactory) -> None:
    for path in ("/v1/models", "/version"):
        simulated, real = await both(vllm, sim, Case(path))
        assert real.status == 200
        assert_same_json(simulated, real)
    simulated, real = await both(vllm, sim, Case("/health"))
    assert (simulated.status, simulated.body) == (real.status, real.body) == (200, b"")


def metric_families(text: str) -> dict[str, str]:
    """vLLM's metric families (`vllm:` names) and their types."""
    out = {}
    for line in text.splitlines():
        if line.startswith("# TYPE vllm:"):
            _, _, name, type_ = line.split()
            out[name] = type_
    return out


def sample_labels(text: str) -> dict[str, set[str]]:
    """Per `vllm:` sample name, the names of its labels."""
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("vllm:") and "{" in line:
            name, labels = line.split("{", 1)
            pairs = labels.rsplit("}", 1)[0].split('",')
            out[name] = {pair.split("=", 1)[0] for pair in pairs}
    return out


async def test_metrics_equal_vllm(vllm: VLLMFleet, sim: SimFactory) -> None:
    """Every family the simulator exports, real vLLM exports too, with the same type and the
    same labels (`model_name`, `engine`, ...); the content type is the same."""
    simulated_url = await simulator(sim)
    # A request first, so both have samples of the per-request families.
    await ask_both(vllm, simulated_url, Case(CHAT, chat()))
    simulated, real = await ask_both(vllm, simulated_url, Case("/metrics"))
    assert simulated.content_type == real.content_type
    sim_text, real_text = simulated.body.decode(), real.body.decode()
    sim_families, real_families = metric_families(sim_text), metric_families(real_text)
    assert sim_families
    assert {n: real_families.get(n) for n in sim_families} == sim_families
    sim_labels, real_labels = sample_labels(sim_text), sample_labels(real_text)
    shared = sim_labels.keys() & real_labels.keys()
    assert "vllm:num_requests_running" in shared
    assert {n: sim_labels[n] for n in shared} == {n: real_labels[n] for n in shared}


# --- the comparison itself (no worker needed) -----------------------------------------------


def test_shape_sees_key_order_types_nulls_and_nesting() -> None:
    base = {"a": 1, "b": {"c": [1.5, None]}}
    assert shape(base) == shape({"a": 7, "b": {"c": [0.5, None, 2.5]}})
    assert shape(base) != shape({"b": {"c": [1.5, None]}, "a": 1})  # order
    assert shape(base) != shape({"a": 1.0, "b": {"c": [1.5, None]}})  # int vs float
    assert shape(base) != shape({"a": 1, "b": {"c": [1.5]}})  # a null item gone
    assert shape(base) != shape({"a": 1, "b": {"c": [1.5, None], "d": None}})  # a new key


def test_shape_reads_logprob_maps_by_their_values() -> None:
    def body(top: dict[str, float]) -> dict[str, Any]:
        return {"choices": [{"logprobs": {"top_logprobs": [None, top]}}]}

    assert shape(body({" a": -1.0})) == shape(body({"xyz": -2.5, " q": -0.1}))
    assert shape(body({" a": -1.0})) != shape(body({" a": 1}))


def event(choice: dict[str, Any], **top: Any) -> bytes:
    payload = {"id": "x", "choices": [choice], **top}
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def test_stream_form_merges_only_token_chunks_of_one_shape() -> None:
    def token(index: int, text: str = "a", ids: Any = None) -> bytes:
        choice = {"index": index, "delta": {"content": text}, "finish_reason": None}
        return event({**choice, "token_ids": ids})

    finish = event({"index": 0, "delta": {"content": "b"}, "finish_reason": "length"})
    done = b"data: [DONE]\n\n"
    one = stream_form(token(0) + finish + done)
    assert stream_form(token(0) + token(0, "bc") + finish + done) == one
    assert stream_form(token(0, ids=[1]) + finish + done) != one
    assert stream_form(token(0) + done) != one
    interleaved = stream_form(token(0) + token(1) + token(0) + finish + done)
    assert interleaved[0] == ["output", "done"]
    assert [k for k, _ in interleaved[1][1]] == ["token"]
