"""Fuzzing the gateway in CI, a few thousand cases: schemathesis from the gateway's own
`/openapi.json`, and hypothesis-generated bodies (any JSON, broken bytes, wrong types, deep
nesting) for the chat route.

The gateway and a simulated worker run as real processes; every case is one HTTP request with a
timeout, so a hang fails the case. Checks: nothing the gateway answers is a 5xx (the simulated
worker only fails when told to, so a 5xx here is the gateway's), and every 4xx is an OpenAI
error body. Examples are derandomized: CI sees the same cases every run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.openapi import document
from tests.processes import GatewayProc, start_gateway, start_simulator, write_config

TIMEOUT = 10.0  # seconds per request: a hang fails the case
JSON = {"Content-Type": "application/json"}


def fuzzing(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProc]:
    worker = start_simulator("--itl", "0", "--ttft", "0", "--default-max-tokens", "4")
    gateway: GatewayProc | None = None
    try:
        config = write_config(
            tmp_path_factory.mktemp("fuzz") / "gateway.yaml",
            [worker.url],
            input={"max_tokens": 64},
        )
        gateway = start_gateway(config)
        yield gateway
    finally:
        if gateway is not None:
            gateway.proc.kill()
        worker.proc.kill()


def check(response: requests.Response, what: str) -> None:
    assert response.status_code < 500, f"{what}: {response.status_code} {response.text[:300]}"
    if response.status_code >= 400:
        body = response.json()
        error = body["error"]
        assert isinstance(error["message"], str), what
        assert isinstance(error["type"], str), what
        assert isinstance(error["code"], str | int), what


SCHEMA = schemathesis.openapi.from_dict(document())
OPERATIONS = {
    f"{op.method.upper()} {op.path}": op for op in (r.ok() for r in SCHEMA.get_all_operations())
}
EXAMPLES = {"POST": 400, "GET": 40}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(OPERATIONS))
def test_schemathesis_cases_from_the_openapi_document(stack: GatewayProc, name: str) -> None:
    operation = OPERATIONS[name]
    session = requests.Session()
    seen = 0

    @fuzzing(EXAMPLES[operation.method.upper()])
    @given(operation.as_strategy())
    def case(case: Any) -> None:
        nonlocal seen
        seen += 1
        response = case.call(base_url=stack.url, session=session, timeout=TIMEOUT)
        check(response, f"{name} {case.body!r:.300}")

    case()
    # A GET without parameters has only one case to give; the POST bodies have thousands.
    assert seen >= (EXAMPLES["POST"] // 2 if operation.method.upper() == "POST" else 1)


JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=50)
)
ANY_JSON = st.recursive(
    JSON_LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=30,
)
# Each field is mostly plausible and sometimes anything at all, so generated bodies get past
# the first check that would refuse them and reach the code behind it.
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "stream": st.booleans(),
    "max_tokens": st.integers(1, 64),
    "max_completion_tokens": st.integers(1, 64),
    "n": st.integers(1, 2),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "user": st.text(max_size=20),
    "tools": st.none(),
    "logprobs": st.booleans(),
    "temperature": st.floats(0, 2),
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=2),
    "seed": st.integers(0, 2**31),
}
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant"]) | ANY_JSON},
    optional={"content": st.text(max_size=200) | ANY_JSON},
)
CHAT_LIKE = st.fixed_dictionaries(
    {
        "model": st.just("sim-model") | ANY_JSON,
        "messages": st.lists(MESSAGE, min_size=1, max_size=4) | ANY_JSON,
    },
    optional={name: value | ANY_JSON for name, value in PLAUSIBLE.items()},
)


def deep(depth: int) -> str:
    """A body nested ``2 * depth`` levels deep (an object and a list per level)."""
    return '{"model": "sim-model", "x": ' + '{"a": [' * depth + "1" + "]}" * depth + "}"


@pytest.mark.timeout(300)
def test_generated_chat_bodies(stack: GatewayProc) -> None:
    session = requests.Session()
    url = f"{stack.url}/v1/chat/completions"

    @fuzzing(1200)
    @given(CHAT_LIKE | ANY_JSON)
    def body(data: Any) -> None:
        raw = json.dumps(data).encode()
        response = session.post(
            url, data=raw, headers={"Content-Type": "application/json"}, timeout=TIMEOUT
        )
        check(response, f"{raw[:300]!r}")

    body()


@pytest.mark.timeout(300)
def test_generated_bytes_and_content_types(stack: GatewayProc) -> None:
    session = requests.Session()
    url = f"{stack.url}/v1/chat/completions"

    @fuzzing(400)
    @given(
        st.binary(max_size=300),
        st.sampled_from(
            [
                "application/json",
                "text/plain",
                "application/json; charset=latin-1",
                "",
                "multipart/form-data",
            ]
        ),
    )
    def raw(data: bytes, content_type: str) -> None:
        headers = {"Content-Type": content_type} if content_type else {}
        response = session.post(url, data=data, headers=headers, timeout=TIMEOUT)
        check(response, f"{content_type} {data[:100]!r}")

    raw()
    for depth in (16, 17, 100, 5000):  # the limit is 32 levels
        response = session.post(url, data=deep(depth), headers=JSON, timeout=TIMEOUT)
        check(response, f"depth {depth}")
        assert response.status_code == 400
