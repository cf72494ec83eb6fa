"""What the gateway hands a chat template, rebuilt as vLLM 0.32 rebuilds it (chat_utils.py,
renderers/hf.py): the content format read from the template, messages with text parts, tool
calls and tool results, tools as vLLM dumps them, and None for what it cannot reproduce.
tests/vllm/test_vllm_kvevents.py checks the ids against real vLLM's own prompt ids."""

from __future__ import annotations

from typing import Any

import jinja2
import pytest

from gateway.chatrender import content_format, conversation

ENV = jinja2.Environment()


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{% for m in messages %}{{ m.content }}{% endfor %}", "string"),
        (
            "{% for m in messages %}{% for p in m.content %}{{ p.text }}{% endfor %}{% endfor %}",
            "openai",
        ),
        ("{% for m in messages %}{% for p in m['content'] %}{% endfor %}{% endfor %}", "openai"),
        (
            "{% set rest = messages[1:] %}{% set turns = rest %}"
            "{% for m in turns %}{% for p in m.content | list %}{% endfor %}{% endfor %}",
            "openai",
        ),
        (
            "{% for m in messages %}{% set content = m.content %}"
            "{% for p in content %}{% endfor %}{% endfor %}",
            "openai",
        ),
        ("{% for m in messages %}{% for t in m.tool_calls %}{% endfor %}{% endfor %}", "string"),
        (
            "{% for m in messages %}{{ m.content | map(attribute='text') | join }}{% endfor %}",
            "string",
        ),
        ("{% for x in documents %}{% for p in x.content %}{% endfor %}{% endfor %}", "string"),
        ("{% for m in messages %}", "string"),  # not a template: vLLM's default
    ],
)
def test_the_content_format_is_read_from_the_template(source: str, expected: str) -> None:
    assert content_format(ENV, source) == expected


def test_text_parts_are_joined_for_a_string_template_and_kept_as_parts_otherwise() -> None:
    parts = [{"type": "text", "text": "a"}, "b"]
    data = {
        "messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": None}]
    }
    assert conversation(data, "string") == (
        [{"role": "user", "content": "a\nb"}, {"role": "assistant", "content": ""}],
        None,
    )
    as_parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert conversation(data, "openai") == (
        [{"role": "user", "content": as_parts}, {"role": "assistant", "content": []}],
        None,
    )
    one = {"messages": [{"role": "user", "content": "hi", "name": "bob"}]}
    assert conversation(one, "openai") == (
        [{"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "bob"}],
        None,
    )


def test_a_tool_result_is_a_string_in_either_format() -> None:
    result = {"role": "tool", "content": [{"type": "text", "text": "1"}, "2"], "tool_call_id": "c"}
    for fmt in ("string", "openai"):
        rebuilt = conversation({"messages": [result]}, fmt)  # type: ignore[arg-type]
        assert rebuilt == ([{"role": "tool", "content": "1\n2", "tool_call_id": "c"}], None)
    # A tool call id is a tool result's only: on another role vLLM drops it.
    user = {"role": "user", "content": "x", "tool_call_id": "c"}
    assert conversation({"messages": [user]}, "string") == (
        [{"role": "user", "content": "x"}],
        None,
    )


def call(arguments: Any, **extra: Any) -> dict[str, Any]:
    return {
        "type": "function",
        "id": "c1",
        "function": {"name": "f", "arguments": arguments},
        **extra,
    }


@pytest.mark.parametrize(
    ("arguments", "parsed"),
    [
        ('{"b": 1, "a": [2]}', {"b": 1, "a": [2]}),
        ("", {}),
        ("not json", {}),
        ("[1, 2]", {}),
        ("42", {}),
    ],
)
def test_tool_call_arguments_become_an_object(arguments: str, parsed: dict[str, Any]) -> None:
    message = {"role": "assistant", "content": None, "tool_calls": [call(arguments, index=0)]}
    rebuilt = conversation({"messages": [message]}, "string")
    assert rebuilt is not None
    [calls] = [m["tool_calls"] for m in rebuilt[0]]
    # vLLM's request model keeps id, function (arguments, name) and type, in that order.
    assert calls == [
        {"id": "c1", "function": {"arguments": parsed, "name": "f"}, "type": "function"}
    ]
    assert list(calls[0]) == ["id", "function", "type"]
    assert list(calls[0]["function"]) == ["arguments", "name"]
    assert message["tool_calls"][0]["function"]["arguments"] == arguments  # body untouched


def test_an_empty_tool_call_list_is_dropped() -> None:
    message = {"role": "assistant", "content": "ok", "tool_calls": []}
    assert conversation({"messages": [message]}, "string") == (
        [{"role": "assistant", "content": "ok"}],
        None,
    )


def test_tools_are_dumped_as_vllm_dumps_them() -> None:
    tools = [
        {"type": "function", "function": {"name": "a", "parameters": {"z": 1, "y": 2}, "x": 0}},
        {"function": {"name": "b", "description": "d", "strict": True}, "defer_loading": True},
    ]
    rebuilt = conversation(
        {"messages": [{"role": "user", "content": "hi"}], "tools": tools}, "string"
    )
    assert rebuilt is not None
    assert rebuilt[1] == [
        {
            "type": "function",
            "function": {"name": "a", "description": None, "parameters": {"z": 1, "y": 2}},
        },
        {
            "type": "function",
            "function": {
                "name": "b",
                "description": "d",
                "parameters": None,
                "strict": True,
                "defer_loading": True,
            },
            "defer_loading": True,
        },
    ]
    assert list(rebuilt[1][0]["function"]["parameters"]) == ["z", "y"]


@pytest.mark.parametrize(
    "data",
    [
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ]
        },
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "cache": 1}]}]},
        {"messages": [{"role": "developer", "content": "be brief"}]},
        {"messages": [{"role": "user", "content": "x", "reasoning": "r"}]},
        {"messages": [{"role": "system", "content": "x-anthropic-billing-header: cch=1\nhi"}]},
        {
            "messages": [
                {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f"}}]}
            ]
        },
        {"messages": [{"role": "assistant", "tool_calls": [{"type": "custom", "id": "c"}]}]},
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": [{"content": "no role"}]},
        {"messages": [{"role": "user", "content": "x"}], "tools": []},
        {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "custom"}]},
        {"messages": [{"role": "user", "content": "x"}], "tools": [{"function": {"name": 1}}]},
        {"messages": []},
        {"messages": "hello"},
    ],
)
def test_what_it_cannot_reproduce_is_none(data: dict[str, Any]) -> None:
    assert conversation(data, "string") is None
