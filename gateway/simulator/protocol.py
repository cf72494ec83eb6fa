"""Request validation: JSON bodies of the three POST endpoints become typed requests, or a
`SimError` with vLLM's status and message. Unknown fields are ignored, as vLLM does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, TypeGuard

from .config import SimConfig
from .errors import SimError, bad_request
from .text import answer_key, count_tokens

Kind = Literal["chat", "completion"]
EmbeddingInput = str | list[int]


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """A validated chat or completions request.

    Tokens `start` .. `start + max_tokens - 1` of the answer keyed by `key` are generated;
    `start` > 0 only when continuing a partial assistant message. `prompt` is the rendered prompt
    as the prefix cache sees it; for chat it also holds each message's role, which
    `prompt_tokens` (the usage count) leaves out.
    """

    kind: Kind
    model: str
    key: bytes
    start: int
    prompt: tuple[str, ...]
    prompt_tokens: int
    max_tokens: int
    stream: bool
    include_usage: bool
    continuous_usage: bool


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    model: str
    inputs: list[EmbeddingInput]
    prompt_tokens: int
    base64: bool


def parse_chat(body: dict[str, Any], config: SimConfig) -> GenerationRequest:
    model = _model(body, config)
    messages = _messages(body)
    start, context = _continuation(body, messages)
    prompt = tuple(word for role, text in messages for word in (role, *text.split()))
    prompt_tokens = sum(count_tokens(text) for _, text in messages)
    requested = _first_int(body, "max_completion_tokens", "max_tokens")
    key = answer_key({"messages": context}, _seed(body))
    return _generation(body, config, "chat", model, key, start, prompt, prompt_tokens, requested)


def parse_completion(body: dict[str, Any], config: SimConfig) -> GenerationRequest:
    model = _model(body, config)
    raw = _single_prompt(body.get("prompt"))
    context: dict[str, object]
    if isinstance(raw, str):
        prompt, context = tuple(raw.split()), {"prompt": raw}
    else:
        prompt, context = tuple(map(str, raw)), {"prompt_token_ids": raw}
    requested = _first_int(body, "max_tokens")
    key = answer_key(context, _seed(body))
    return _generation(body, config, "completion", model, key, 0, prompt, len(prompt), requested)


def parse_embedding(body: dict[str, Any], config: SimConfig) -> EmbeddingRequest:
    model = _model(body, config)
    inputs = _embedding_inputs(body.get("input"))
    tokens = sum(count_tokens(x) if isinstance(x, str) else len(x) for x in inputs)
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise bad_request("encoding_format must be 'float' or 'base64'", "encoding_format")
    return EmbeddingRequest(model, inputs, tokens, encoding == "base64")


def _generation(
    body: dict[str, Any],
    config: SimConfig,
    kind: Kind,
    model: str,
    key: bytes,
    start: int,
    prompt: tuple[str, ...],
    prompt_tokens: int,
    requested: int | None,
) -> GenerationRequest:
    _check_n(body)
    stream = _bool(body, "stream", default=False)
    include_usage, continuous = _stream_options(body, stream)
    if requested is None and start:
        # The answer's natural end (its EOS) is default_max_tokens tokens in: a continuation
        # without a limit finishes that same answer, as vLLM's would end at the same EOS.
        requested = max(config.default_max_tokens - start, 1)
    max_tokens = _max_tokens(config, prompt_tokens, requested)
    return GenerationRequest(
        kind,
        model,
        key,
        start,
        prompt,
        prompt_tokens,
        max_tokens,
        stream,
        include_usage,
        continuous,
    )


def _model(body: dict[str, Any], config: SimConfig) -> str:
    model = body.get("model")
    if model is None:
        return config.models[0]
    if not isinstance(model, str):
        raise bad_request("model must be a string", "model")
    if model not in config.models:
        raise SimError(404, f"The model `{model}` does not exist.", "model")
    return model


def _messages(body: dict[str, Any]) -> list[tuple[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    return [_message(i, message) for i, message in enumerate(messages)]


def _message(index: int, message: object) -> tuple[str, str]:
    param = f"messages[{index}]"
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise bad_request(f"{param} must be an object with a string role", param)
    return message["role"], _content_text(message.get("content"), param)


def _content_text(content: object, param: str) -> str:
    """The text of a message's content: a string, null, or a list of content parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise bad_request(f"{param}.content must be a string or a list of parts", param)
    texts = []
    for part in content:
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise bad_request(f"{param}.content parts must be objects with a type", param)
        if part["type"] == "text":
            if not isinstance(part.get("text"), str):
                raise bad_request(f"{param}.content text parts need a string text", param)
            texts.append(part["text"])
    return " ".join(texts)


def _continuation(
    body: dict[str, Any], messages: list[tuple[str, str]]
) -> tuple[int, list[list[str]]]:
    """The first token index to generate, and the conversation that keys the answer.

    The key never includes a trailing assistant message, so continuing a partial answer of k
    tokens (`continue_final_message`) generates tokens k.. of the answer to the same question.
    """
    continue_final = _bool(body, "continue_final_message", default=False)
    if continue_final and _bool(body, "add_generation_prompt", default=True):
        raise bad_request(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
        )
    trailing_assistant = messages[-1][0] == "assistant"
    if continue_final and not trailing_assistant:
        raise bad_request("continue_final_message needs a final assistant message", "messages")
    context = messages[:-1] if trailing_assistant else messages
    start = count_tokens(messages[-1][1]) if continue_final else 0
    return start, [[role, text] for role, text in context]


def _single_prompt(prompt: object) -> str | list[int]:
    """One completions prompt: text or token ids, optionally wrapped in a one-element list."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("Prompt cannot be empty", "prompt")
        return prompt
    if _is_token_ids(prompt):
        return list(prompt)
    raise bad_request(
        "prompt must be a string or a list of token ids (the simulator takes one prompt)",
        "prompt",
    )


def _embedding_inputs(raw: object) -> list[EmbeddingInput]:
    if isinstance(raw, str):
        return [raw]
    if _is_token_ids(raw):
        return [list(raw)]
    if isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
        return list(raw)
    if isinstance(raw, list) and raw and all(_is_token_ids(x) for x in raw):
        return [list(x) for x in raw]
    raise bad_request(
        "input must be a string, a list of strings, a list of token ids or a list of those",
        "input",
    )


def _is_token_ids(value: object) -> TypeGuard[list[int]]:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value)
    )


def _max_tokens(config: SimConfig, prompt_tokens: int, requested: int | None) -> int:
    room = config.max_model_len - prompt_tokens
    if requested is None:
        requested = min(config.default_max_tokens, room)
    if requested < 1 or prompt_tokens + requested > config.max_model_len:
        raise bad_request(
            f"This model's maximum context length is {config.max_model_len} tokens. However, "
            f"you requested {prompt_tokens + max(requested, 1)} tokens ({prompt_tokens} in the "
            f"prompt, {max(requested, 1)} for the completion). Please reduce the length of the "
            "prompt or the completion."
        )
    return requested


def _first_int(body: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise bad_request(f"{name} must be an integer >= 1", name)
        return value
    return None


def _seed(body: dict[str, Any]) -> int | None:
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise bad_request("seed must be an integer", "seed")
    return seed


def _check_n(body: dict[str, Any]) -> None:
    n = body.get("n", 1)
    if n is not None and n != 1:
        raise bad_request("the simulator supports only n=1", "n")


def _bool(body: dict[str, Any], name: str, *, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be a boolean", name)
    return value


def _stream_options(body: dict[str, Any], stream: bool) -> tuple[bool, bool]:
    options = body.get("stream_options")
    if options is None:
        return False, False
    if not stream:
        raise bad_request("Stream options can only be defined when `stream=True`.", "stream")
    if not isinstance(options, dict):
        raise bad_request("stream_options must be an object", "stream_options")
    include = _bool(options, "include_usage", default=False)
    return include, include and _bool(options, "continuous_usage_stats", default=False)
