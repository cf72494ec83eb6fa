"""The gateway's own token ids for chat prompts (gateway/tokenizer.py with gateway/chatrender.py)
equal the prompt ids real vLLM renders for the same request (``return_token_ids``): text parts,
names, function tools, assistant tool calls and tool results, not only plain messages, and a
prompt without the generation prompt or continuing the final message. The tiny
model's template loops over a message's content, so vLLM hands it parts ("openai" format); its
tools are written with ``tojson`` and each call's arguments as the object vLLM parsed."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest

from gateway.tokenizer import PromptTokenizer
from tests.vllm.compare import TIMEOUT
from tests.vllm.conftest import VLLMFleet
from tests.vllm.fleet import MODEL, MODEL_DIR

TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look a word up",
        "parameters": {"type": "object", "properties": {"word": {"type": "string"}}},
    },
}
CALL = {
    "id": "call-1",
    "type": "function",
    "function": {"name": "lookup", "arguments": '{"word": "gate", "n": [1, 2]}'},
}
TURNS: list[dict[str, Any]] = [
    {"role": "system", "content": "You route requests."},
    {"role": "user", "content": "Look up gate."},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "content": "a gate is a way in", "tool_call_id": "call-1"},
]
CASES: dict[str, dict[str, Any]] = {
    "text-parts": {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "one"},
                    "two",
                    {"type": "text", "text": "three"},
                ],
            }
        ]
    },
    "name": {"messages": [{"role": "user", "content": "hi", "name": "bob"}]},
    "tools": {"messages": TURNS[:2], "tools": [TOOL], "tool_choice": "auto"},
    "tool-loop": {"messages": TURNS, "tools": [TOOL, {**TOOL, "function": {"name": "x"}}]},
    "tool-result-parts": {
        "messages": [*TURNS[:3], {**TURNS[3], "content": [{"type": "text", "text": "a"}, "b"]}],
        "tools": [TOOL],
    },
    "bad-arguments": {
        "messages": [
            TURNS[1],
            {
                **TURNS[2],
                "tool_calls": [{**CALL, "function": {"name": "lookup", "arguments": "no"}}],
            },
            TURNS[3],
        ],
        "tools": [TOOL],
    },
    "no-generation-prompt": {
        "messages": [*TURNS[:2], {"role": "assistant", "content": "It is a way in."}],
        "add_generation_prompt": False,
    },
    "continue-final-message": {
        "messages": [TURNS[1], {"role": "assistant", "content": "A gate is "}],
        "add_generation_prompt": False,
        "continue_final_message": True,
    },
    # The tiny template leaves a final assistant message open; a user message it closes, so
    # here the cut drops what it writes after the text.
    "continue-closed-message": {
        "messages": [{"role": "user", "content": "Look up ga"}],
        "add_generation_prompt": False,
        "continue_final_message": True,
    },
    "continue-last-text-part": {
        "messages": [
            TURNS[1],
            {"role": "assistant", "content": [{"type": "text", "text": "A gate"}, " is"]},
        ],
        "add_generation_prompt": False,
        "continue_final_message": True,
    },
}


@pytest.mark.parametrize("name", list(CASES))
async def test_chat_ids_equal_vllm_prompt_ids(vllm: VLLMFleet, name: str) -> None:
    body = {
        "model": MODEL,
        "max_tokens": 1,
        "temperature": 0,
        "return_token_ids": True,
        **CASES[name],
    }
    ours = PromptTokenizer(MODEL_DIR / "tokenizer.json").chat_ids(body)
    async with (
        aiohttp.ClientSession() as session,
        session.post(vllm.plain.url + "/v1/chat/completions", json=body, timeout=TIMEOUT) as got,
    ):
        assert got.status == 200, await got.text()
        answer = orjson.loads(await got.read())
    assert ours is not None
    assert ours == answer["prompt_token_ids"]
