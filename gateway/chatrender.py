"""What vLLM hands a model's chat template for a ``/v1/chat/completions`` request, rebuilt in the
gateway so that cache-aware routing can tokenize chats with tools and content parts.

vLLM (0.32: ``renderers/chat_utils.py`` and ``renderers/hf.py``) does not give the template the
request's messages as sent. It rebuilds each message (role, content, and per role the tool
calls, the tool call id and the name), puts the content in one of two shapes chosen by reading
the template (``content_format``), parses every tool call's arguments from their JSON string
into an object, and dumps each tool through its own request model (fixed keys, unknown ones
dropped). ``conversation`` does the same for the shapes it can reproduce exactly: text content
(strings and text parts), function tools, assistant tool calls, tool results, names. Anything
else (images and other media, the developer role, reasoning fields) returns None and the
request is routed by the configured policy: a wrong guess could only cost a cache miss.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import jinja2
import jinja2.nodes as nodes

ContentFormat = Literal["string", "openai"]
Message = dict[str, Any]

_MESSAGE_KEYS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id"})
_BILLING_HEADER = "x-anthropic-billing-header"  # vLLM strips this line from system text


def content_format(env: jinja2.Environment, source: str) -> ContentFormat:
    """ "openai" (content as a list of ``{"type": "text", "text": ...}`` parts) when the template
    loops over a message's content, else "string" (the texts joined by newlines): the rule vLLM
    applies to the template's syntax tree for ``--chat-template-content-format auto``. Loops over
    a macro's parameter bound to a message's content are not followed, so such a template is
    read as "string" here; its chats with list content then miss the cache, nothing worse."""
    try:
        tree = env.parse(source)
    except jinja2.TemplateSyntaxError:
        return "string"
    lists = _derived(tree, "messages")
    items = {
        loop.target.name
        for loop in tree.find_all(nodes.For)
        if isinstance(loop.target, nodes.Name) and any(_reads(loop.iter, n) for n in lists)
    }
    in_macros = {
        id(loop) for macro in tree.find_all(nodes.Macro) for loop in macro.find_all(nodes.For)
    }
    for loop in tree.find_all(nodes.For):
        if any(_reads(loop.iter, item, "content") for item in items):
            return "openai"
        if id(loop) not in in_macros and _reads(loop.iter, "content"):
            return "openai"
    return "string"


def conversation(
    data: dict[str, Any], fmt: ContentFormat
) -> tuple[list[Message], list[dict[str, Any]] | None] | None:
    """The messages and tools vLLM renders for this request body, or None when we cannot say."""
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    tools = _tools(data.get("tools"))
    if tools is False:
        return None
    out: list[Message] = []
    for message in messages:
        rebuilt = _message(message, fmt)
        if rebuilt is None:
            return None
        out.append(rebuilt)
    return out, tools


def _message(message: object, fmt: ContentFormat) -> Message | None:
    if not isinstance(message, dict) or not message.keys() <= _MESSAGE_KEYS:
        return None
    role = message.get("role")
    if not isinstance(role, str) or role == "developer":
        return None
    texts = _texts(message.get("content"))
    if texts is None or (role == "system" and any(t.startswith(_BILLING_HEADER) for t in texts)):
        return None
    out: Message = {"role": role}
    if fmt == "string" or role == "tool":  # a tool result's text parts are always joined
        out["content"] = "\n".join(texts)
    else:
        out["content"] = [{"type": "text", "text": text} for text in texts]
    if role == "assistant" and message.get("tool_calls") is not None:
        calls = _tool_calls(message["tool_calls"])
        if calls is None:
            return None
        if calls:
            out["tool_calls"] = calls
    elif role == "tool" and "tool_call_id" in message:
        out["tool_call_id"] = message["tool_call_id"]
    if isinstance(message.get("name"), str):
        out["name"] = message["name"]
    return out


def _texts(content: object) -> list[str] | None:
    """The text parts of a message's content (a string is one part), or None for anything else."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        return None
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif (
            isinstance(part, dict)
            and part.keys() == {"type", "text"}
            and part["type"] == "text"
            and isinstance(part["text"], str)
        ):
            texts.append(part["text"])
        else:
            return None
    return texts


def _tool_calls(calls: object) -> list[dict[str, Any]] | None:
    """An assistant's tool calls as the template sees them: validated as vLLM's request model
    does (``id``, ``function`` with ``arguments`` and ``name``, ``type``, in that order; other
    keys dropped), then each function's ``arguments`` parsed from its JSON string into an
    object, ``{}`` when empty, not JSON or not an object."""
    if not isinstance(calls, list):
        return None
    out = []
    for call in calls:
        if not isinstance(call, dict) or call.get("type") != "function":
            return None
        function = call.get("function")
        if not (
            isinstance(call.get("id"), str)
            and isinstance(function, dict)
            and isinstance(function.get("name"), str)
            and isinstance(function.get("arguments"), str)
        ):
            return None
        try:
            parsed = json.loads(function["arguments"] or "{}")
        except ValueError:
            parsed = {}
        arguments = parsed if isinstance(parsed, dict) else {}
        out.append(
            {
                "id": call["id"],
                "function": {"arguments": arguments, "name": function["name"]},
                "type": "function",
            }
        )
    return out


def _tools(tools: object) -> list[dict[str, Any]] | Literal[False] | None:
    """Function tools as vLLM dumps them (type, then the function's name, description and
    parameters, then strict and defer_loading only when set; other keys dropped); False when a
    tool is not one we can reproduce."""
    if tools is None:
        return None
    if not isinstance(tools, list) or not tools:
        return False
    out = []
    for tool in tools:
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            return False
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            return False
        description = function.get("description")
        parameters = function.get("parameters")
        strict, defer = function.get("strict"), function.get("defer_loading")
        outer_defer = tool.get("defer_loading")
        if not (
            isinstance(description, (str, type(None)))
            and isinstance(parameters, (dict, type(None)))
            and all(isinstance(v, (bool, type(None))) for v in (strict, defer, outer_defer))
        ):
            return False
        if defer is None:
            defer = outer_defer
        dumped: dict[str, Any] = {
            "name": function["name"],
            "description": description,
            "parameters": parameters,
        }
        if strict is not None:
            dumped["strict"] = strict
        if defer is not None:
            dumped["defer_loading"] = defer
        entry: dict[str, Any] = {"type": "function", "function": dumped}
        if outer_defer is not None:
            entry["defer_loading"] = outer_defer
        out.append(entry)
    return out


def _derived(tree: nodes.Template, name: str) -> set[str]:
    """``name`` and every variable set from it (``{% set rest = messages[1:] %}``), transitively."""
    found, queue = {name}, [name]
    while queue:
        source = queue.pop()
        for assign in tree.find_all(nodes.Assign):
            target = assign.target
            if (
                isinstance(target, nodes.Name)
                and target.name not in found
                and _reads(assign.node, source)
            ):
                found.add(target.name)
                queue.append(target.name)
    return found


def _reads(node: nodes.Node, name: str, key: str | None = None) -> bool:
    """Whether ``node`` is the variable ``name`` (or its ``key``), through filters, tests and
    slices."""
    node = _unwrap(node)
    if key is None:
        return isinstance(node, nodes.Name) and node.ctx == "load" and node.name == name
    if isinstance(node, nodes.Getattr):
        return node.attr == key and _reads_name(node.node, name)
    if isinstance(node, nodes.Getitem):
        arg = node.arg
        return isinstance(arg, nodes.Const) and arg.value == key and _reads_name(node.node, name)
    return False


def _reads_name(node: nodes.Node, name: str) -> bool:
    return isinstance(node, nodes.Name) and node.ctx == "load" and node.name == name


def _unwrap(node: nodes.Node) -> nodes.Node:
    while True:
        sliced = isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice)
        inner = getattr(node, "node", None)
        if not (sliced or isinstance(node, (nodes.Filter, nodes.Test))) or inner is None:
            return node
        node = inner
