"""End to end with real clients: the OpenAI SDK (sync, async, streaming, errors mapped to its
exception classes), ``curl -N``, and the README's first command, ``make run``.

Everything runs as subprocesses, the way a user starts it: two simulated workers
(``python -m gateway.simulator``, 30 ms per token) and ``python -m gateway`` in front of them,
shared by the module. Fault injection goes through the ``X-Sim-Fault`` request header, which
the gateway forwards to whichever worker it picks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.processes import (
    GatewayProc,
    Proc,
    Sim,
    http_status,
    poll_until,
    port_in_use,
    start_gateway,
    start_simulator,
    write_config,
)

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
MODEL = "sim-model"
ITL = 0.03  # seconds per token on the workers
FIRST_TOKEN_TIMEOUT = 1.0  # the module gateway's; far above the workers' ~20 ms
MAKE_RUN_PORTS = (8080, 8001, 8002)  # Makefile and config/local.yaml


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProc]:
    sims: list[Sim] = []
    gateway: GatewayProc | None = None
    try:
        for _ in range(2):
            sims.append(
                start_simulator(
                    "--itl", str(ITL), "--itl-per-seq", "0", "--default-max-tokens", "16"
                )
            )
        config = write_config(
            tmp_path_factory.mktemp("e2e") / "gateway.yaml",
            [sim.url for sim in sims],
            timeouts={"first_token": FIRST_TOKEN_TIMEOUT, "total": 30.0},
            # The fault tests fail requests on purpose; no worker may be ejected for it, or a
            # later test would depend on the order the tests ran in.
            health={"failures_to_eject": 1000},
        )
        gateway = start_gateway(config)
        yield gateway
    finally:
        if gateway is not None:
            gateway.proc.kill()
        for sim in sims:
            sim.proc.kill()


@pytest.fixture
def sdk(stack: GatewayProc) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{stack.url}/v1", api_key="none", max_retries=0) as client:
        yield client


def user(text: str = "Tell me about gateways") -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": text}]


# --- the OpenAI SDK, sync -------------------------------------------------------------------


def test_sdk_chat(sdk: openai.OpenAI) -> None:
    answer = sdk.chat.completions.create(model=MODEL, messages=user(), max_tokens=5)
    assert answer.object == "chat.completion"
    assert answer.model == MODEL
    choice = answer.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.role == "assistant"
    assert choice.message.content is not None
    assert len(choice.message.content.split()) == 5
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 5
    assert answer.usage.prompt_tokens > 0


def test_sdk_chat_stream_with_usage(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(
        model=MODEL,
        messages=user(),
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage, chunks = [], [], [], 0
    with stream:
        for chunk in stream:
            chunks += 1
            assert chunk.object == "chat.completion.chunk"
            for choice in chunk.choices:
                text.append(choice.delta.content or "")
                if choice.finish_reason:
                    finish.append(choice.finish_reason)
            if chunk.usage is not None:
                assert chunk.choices == []  # the usage chunk comes alone, last
                usage.append(chunk.usage)
    assert chunks >= 7  # role + 6 tokens (+ usage): really streamed, not one blob
    assert len("".join(text).split()) == 6
    assert finish == ["length"]
    assert len(usage) == 1
    assert usage[0].completion_tokens == 6
    assert usage[0].total_tokens == usage[0].prompt_tokens + 6


def test_sdk_completions(sdk: openai.OpenAI) -> None:
    answer = sdk.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4)
    assert answer.object == "text_completion"
    assert answer.choices[0].finish_reason == "length"
    assert len(answer.choices[0].text.split()) == 4
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 4


def test_sdk_embeddings(sdk: openai.OpenAI) -> None:
    result = sdk.embeddings.create(model=MODEL, input=["first text", "second text"])
    assert [item.index for item in result.data] == [0, 1]
    for item in result.data:
        assert len(item.embedding) == 16  # the simulator's --embedding-dim default
        assert all(isinstance(x, float) for x in item.embedding)
    assert result.data[0].embedding != result.data[1].embedding
    assert result.usage.prompt_tokens > 0


def test_sdk_models_list(sdk: openai.OpenAI) -> None:
    models = sdk.models.list()
    assert MODEL in [model.id for model in models]


# --- the OpenAI SDK, async ------------------------------------------------------------------


async def test_async_sdk_chat_stream(stack: GatewayProc) -> None:
    async with openai.AsyncOpenAI(
        base_url=f"{stack.url}/v1", api_key="none", max_retries=0
    ) as client:
        stream = await client.chat.completions.create(
            model=MODEL, messages=user(), max_tokens=5, stream=True
        )
        text, finish = [], []
        async with stream:
            async for chunk in stream:
                for choice in chunk.choices:
                    text.append(choice.delta.content or "")
                    if choice.finish_reason:
                        finish.append(choice.finish_reason)
        answer = await client.chat.completions.create(model=MODEL, messages=user(), max_tokens=2)
    assert len("".join(text).split()) == 5
    assert finish == ["length"]
    assert answer.choices[0].finish_reason == "length"


# --- errors, as the SDK's exception classes -------------------------------------------------


def test_unknown_model_is_not_found_error(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.chat.completions.create(model="no-such-model", messages=user())
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"
    assert caught.value.param == "model"
    assert "no-such-model" in caught.value.message


def test_empty_model_is_the_workers_to_judge(sdk: openai.OpenAI) -> None:
    """A fleet of one model routes a request without one to it, as vLLM serves it: whatever
    the answer, it is the worker's, not a gateway 400."""
    try:
        sdk.chat.completions.create(model="", messages=user())
    except openai.APIStatusError as caught:
        assert caught.code != "invalid_field"


def test_bad_field_in_extra_body_is_bad_request_error(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model=MODEL, messages=user(), extra_body={"stream": "yes"})
    assert caught.value.status_code == 400
    assert caught.value.param == "stream"


def test_worker_overload_is_503_internal_server_error(sdk: openai.OpenAI) -> None:
    # Every worker answers 503 to this request (the header goes wherever the gateway sends it),
    # so after failing over the gateway relays the worker's own OpenAI-shaped 503.
    with pytest.raises(openai.InternalServerError) as caught:
        sdk.chat.completions.create(
            model=MODEL, messages=user(), extra_headers={"X-Sim-Fault": "overload"}
        )
    assert isinstance(caught.value, openai.APIStatusError)
    assert caught.value.status_code == 503
    assert "overloaded" in caught.value.message


def test_first_token_timeout_is_504(sdk: openai.OpenAI) -> None:
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        sdk.chat.completions.create(
            model=MODEL,
            messages=user(),
            stream=True,
            extra_headers={"X-Sim-Fault": "slow_first_token=5"},
        )
    elapsed = time.monotonic() - started
    assert caught.value.status_code == 504
    assert isinstance(caught.value, openai.InternalServerError)  # the SDK's class for 5xx
    assert caught.value.code == "first_token_timeout"
    assert caught.value.type == "timeout_error"
    assert elapsed < 5, "the worker's own 5 s delay, not the gateway's first-token timeout"


def test_mid_stream_failure_raises_api_error_while_iterating(sdk: openai.OpenAI) -> None:
    # The worker cuts the connection after 2 tokens: the stream is committed (status 200), so
    # the gateway ends it with one in-band error event, which the SDK raises as an APIError.
    stream = sdk.chat.completions.create(
        model=MODEL,
        messages=user(),
        max_tokens=10,
        stream=True,
        extra_headers={"X-Sim-Fault": "cut_after=2"},
    )
    text = []
    with stream, pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            for choice in chunk.choices:
                assert choice.finish_reason is None  # never looks complete
                text.append(choice.delta.content or "")
    assert not isinstance(caught.value, openai.APIStatusError)  # in-band, after a 200
    assert caught.value.code == "upstream_stream_truncated"
    assert caught.value.type == "upstream_error"
    assert len("".join(text).split()) == 2


# --- curl -N --------------------------------------------------------------------------------


def test_curl_streams_tokens_as_they_arrive(stack: GatewayProc) -> None:
    curl = shutil.which("curl")
    assert curl, "curl is not installed: the end-to-end suite needs it (apt-get install curl)"
    tokens = 30  # 30 x 30 ms: the first token comes ~0.9 s before the last
    body = {"model": MODEL, "messages": user(), "max_tokens": tokens, "stream": True}
    cmd = [curl, "-sSN", "--max-time", "20", f"{stack.url}/v1/chat/completions"]
    cmd += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
    started = time.monotonic()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        lines = [(time.monotonic() - started, raw.decode().rstrip("\n")) for raw in proc.stdout]
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        code = proc.wait(20)
    assert code == 0, stderr
    data = [(at, line[len("data: ") :]) for at, line in lines if line.startswith("data: ")]
    content = [
        at
        for at, payload in data
        if payload != "[DONE]" and json.loads(payload)["choices"][0]["delta"].get("content")
    ]
    assert len(content) == tokens
    assert data[-1][1] == "[DONE]"
    assert [line for _, line in lines if line][-1] == "data: [DONE]"
    spread = content[-1] - content[0]
    assert spread > 0.5 * (tokens - 1) * ITL, f"all tokens arrived within {spread:.3f}s"
    # Incremental, not held back and flushed at the end: few tokens in the last 100 ms.
    late = [at for at in content if at > content[-1] - 0.1]
    # Half, not the 3 or 4 expected: curl's lines are timed as this process reads the pipe,
    # and a busy machine can hold a few back together.
    assert len(late) <= tokens // 2, f"{len(late)} of {tokens} tokens came in the last 100 ms"


# --- make run -------------------------------------------------------------------------------


def test_make_run_serves_the_openai_sdk() -> None:
    make = shutil.which("make")
    assert make, "make is not installed"
    for port in MAKE_RUN_PORTS:
        if port_in_use(port):
            pytest.fail(
                f"port {port} on 127.0.0.1 is already in use, and `make run` needs ports "
                f"{MAKE_RUN_PORTS}: stop what listens there (see `ss -ltnp 'sport = :{port}'`)"
            )
    url = "http://127.0.0.1:8080"
    proc = Proc([make, "--no-print-directory", "run"], cwd=ROOT, name="make run")
    try:
        poll_until(
            lambda: http_status(url, "/ready") == 200 or proc.popen.poll() is not None,
            30,
            "make run: http://127.0.0.1:8080/ready is 200",
        )
        assert proc.popen.poll() is None, f"make run exited:\n{proc.output}"
        with openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0) as client:
            stream = client.chat.completions.create(
                model=MODEL, messages=user(), max_tokens=5, stream=True
            )
            with stream:
                chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert len(text.split()) == 5
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        # Ctrl-C: the whole process group gets the signal, as from a terminal.
        os.killpg(proc.popen.pid, signal.SIGINT)
        proc.wait_exit(15)
        poll_until(
            lambda: not any(port_in_use(port) for port in MAKE_RUN_PORTS),
            10,
            f"make run left nothing listening on {MAKE_RUN_PORTS}",
        )
    finally:
        proc.kill()
