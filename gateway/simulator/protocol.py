"""Request validation: JSON bodies of the three POST endpoints become typed requests, or a
`SimError` with vLLM's status, message and `param`. Unknown fields are ignored, as vLLM does.

Counting follows vLLM 0.32: a prompt's tokens are its token ids (a chat prompt's include the
template's role and generation-prompt tokens, see `text.py`); a prompt over the context is a
400 naming `input_tokens`; `max_tokens` over the context alone is a 400; a prompt plus
`max_tokens` over the context is clamped to what is left; without `max_tokens` the answer runs
to its end-of-sequence token (`SimConfig.default_max_tokens`) or to the end of the context.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal, TypeGuard

from .config import SimConfig
from .errors import SimError, bad_request, invalid
from .text import answer_key, chat_header, count_tokens, find_header, text_ids, word_id

Kind = Literal["chat", "completion"]
EmbeddingInput = str | list[int]
FINISH_LENGTH = "length"
FINISH_STOP = "stop"
MAX_TOP_LOGPROBS = 20
MAX_N_SEQUENCES = 16384  # vLLM's VLLM_MAX_N_SEQUENCES default: a larger n is a 400


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """A validated chat or completions request.

    Each of the `n` choices generates tokens `start` .. `start + max_tokens - 1` of its answer
    (keyed by `key`, see `text.choice_key`) and then ends with `finish_reason`. `start` > 0
    when continuing a partial answer (`continue_final_message`, or a completions prompt that
    holds a chat's prompt ids and part of its answer). `logprobs` is the number of alternatives
    per token (None: no logprobs). `echo_only` is completions' `echo` with `max_tokens: 0`:
    the engine still samples one token, which usage counts and the text leaves out.
    """

    kind: Kind
    model: str
    key: bytes
    start: int
    prompt_ids: tuple[int, ...]
    prompt_text: str
    max_tokens: int
    finish_reason: str
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False
    return_token_ids: bool = False
    logprobs: int | None = None
    echo: bool = False
    echo_only: bool = False
    cache_ids: tuple[int, ...] | None = None  # the prompt as a real tokenizer makes it
    dp_rank: int = 0  # the data-parallel engine that serves it (its prefix cache)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    model: str
    inputs: list[EmbeddingInput]
    prompt_tokens: int
    base64: bool


@dataclass(frozen=True, slots=True)
class _Prompt:
    """What the kind-specific parsing found: the answer, where it starts, the prompt."""

    key: bytes
    start: int
    ids: list[int]
    text: str
    tokenized: bool  # the prompt was text (vLLM's tokenizer stops counting at the limit + 1)


def parse_chat(body: dict[str, Any], config: SimConfig) -> GenerationRequest:
    options = _common(body)
    model = _model(body, config)
    messages = _messages(body)
    continue_final = _continue_final(body, messages)
    context = messages[:-1] if messages[-1][0] == "assistant" else messages
    key = answer_key({"messages": [[role, text] for role, text in context]}, _seed(body))
    rendered = messages[:-1] if continue_final else messages
    ids = [i for role, text in rendered for i in (word_id(f"<|{role}|>"), *text_ids(text))]
    partial = text_ids(messages[-1][1]) if continue_final else []
    prompt = _Prompt(key, len(partial), [*ids, *chat_header(key), *partial], "", True)
    requested = _requested(body, "max_completion_tokens", "max_tokens")
    return _generation(
        body, config, "chat", model, prompt, requested, options, _chat_logprobs(body)
    )


def parse_completion(body: dict[str, Any], config: SimConfig) -> GenerationRequest:
    options = _common(body)
    model = _model(body, config)
    prompt = _completion_prompt(_single_prompt(body.get("prompt")), _seed(body))
    echo = _bool(body, "echo", default=False)
    requested = _requested(body, "max_tokens", zero_ok=echo)
    logprobs = _completion_logprobs(body)
    gen = _generation(body, config, "completion", model, prompt, requested, options, logprobs)
    if not echo:
        return gen
    text = "" if gen.return_token_ids else prompt.text  # vLLM echoes no text with token ids
    return replace(gen, echo=True, echo_only=requested == 0, prompt_text=text)


def parse_embedding(body: dict[str, Any], config: SimConfig) -> EmbeddingRequest:
    model = _model(body, config)
    inputs = _embedding_inputs(body.get("input"))
    tokens = sum(count_tokens(x) if isinstance(x, str) else len(x) for x in inputs)
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise bad_request("encoding_format must be 'float' or 'base64'", "encoding_format")
    return EmbeddingRequest(model, inputs, tokens, encoding == "base64")


@dataclass(frozen=True, slots=True)
class _Options:
    n: int
    stream: bool
    include_usage: bool
    continuous_usage: bool
    return_token_ids: bool


def _common(body: dict[str, Any]) -> _Options:
    """The fields both endpoints share, checked before the model as vLLM's schema is."""
    stream = _bool(body, "stream", default=False)
    include_usage, continuous = _stream_options(body, stream)
    return_ids = _bool(body, "return_token_ids", default=False)
    return _Options(_n(body), stream, include_usage, continuous, return_ids)


def _generation(
    body: dict[str, Any],
    config: SimConfig,
    kind: Kind,
    model: str,
    prompt: _Prompt,
    requested: int | None,
    options: _Options,
    logprobs: int | None,
) -> GenerationRequest:
    if requested is not None and requested > config.max_model_len:
        name = _limit_field(body)
        raise invalid(
            name,
            f"{name}={requested} cannot be greater than max_model_len={config.max_model_len}. "
            "Please request fewer output tokens.",
            requested,
        )
    _check_prompt_length(config, prompt)
    max_tokens, finish = _max_tokens(config, prompt, requested)
    return GenerationRequest(
        kind,
        model,
        prompt.key,
        prompt.start,
        tuple(prompt.ids),
        prompt.text,
        max_tokens,
        finish,
        options.n,
        options.stream,
        options.include_usage,
        options.continuous_usage,
        options.return_token_ids,
        logprobs,
    )


def _check_prompt_length(config: SimConfig, prompt: _Prompt) -> None:
    limit = config.max_model_len
    count = len(prompt.ids)
    if count <= limit:
        return
    if prompt.tokenized:
        # vLLM tokenizes text with truncation to the limit + 1: it only knows "at least".
        count = limit + 1
    qualifier = "at least " if count == limit + 1 else ""
    raise invalid(
        "input_tokens",
        f"This model's maximum context length is {limit} tokens. However, your prompt contains "
        f"{qualifier}{count} input tokens, which exceeds this limit even without any output "
        "tokens. Please reduce the length of the input prompt.",
        count,
    )


def _max_tokens(config: SimConfig, prompt: _Prompt, requested: int | None) -> tuple[int, str]:
    """Tokens to generate per choice, and the finish reason once they are all generated."""
    room = config.max_model_len - len(prompt.ids)
    if requested == 0:
        return 1, FINISH_LENGTH  # echo without generation: vLLM samples one token anyway
    if requested is not None:
        return _at_least_one(min(requested, room)), FINISH_LENGTH
    # Without a limit the answer ends at its end-of-sequence token, the same for a
    # continuation of it, unless the context runs out first.
    natural = max(config.default_max_tokens - prompt.start, 1)
    if natural <= room:
        return natural, FINISH_STOP
    return _at_least_one(room), FINISH_LENGTH


def _at_least_one(max_tokens: int) -> int:
    if max_tokens < 1:
        raise invalid("max_tokens", f"max_tokens must be at least 1, got {max_tokens}.", max_tokens)
    return max_tokens


def _limit_field(body: dict[str, Any]) -> str:
    return (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )


def _model(body: dict[str, Any], config: SimConfig) -> str:
    model = body.get("model")
    if model is None:
        return config.models[0]
    if not isinstance(model, str):
        raise bad_request("model must be a string", "model")
    if model not in config.models:
        raise SimError(
            404,
            f"The model `{model}` does not exist. Valid aliases: {', '.join(config.models)}.",
            "model",
        )
    return model


def _messages(body: dict[str, Any]) -> list[tuple[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise bad_request("messages must be a list", "messages")
    if not messages:
        raise bad_request(
            "Cannot apply chat template to an empty conversation. Provide at least one message."
        )
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


def _continue_final(body: dict[str, Any], messages: list[tuple[str, str]]) -> bool:
    """Whether to continue the final assistant message: its words are then the answer's
    first tokens, since the answer's key never includes a trailing assistant message."""
    continue_final = _bool(body, "continue_final_message", default=False)
    if continue_final and _bool(body, "add_generation_prompt", default=True):
        raise bad_request(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
        )
    if continue_final and messages[-1][0] != "assistant":
        raise bad_request("continue_final_message needs a final assistant message", "messages")
    return continue_final


def _completion_prompt(raw: str | list[int], seed: int | None) -> _Prompt:
    """A text prompt, a prompt of token ids, or the continuation of a chat's answer: token
    ids that contain a chat prompt's header (see `text.py`)."""
    if isinstance(raw, str):
        key = answer_key({"prompt": raw}, seed)
        return _Prompt(key, 0, text_ids(raw), raw, True)
    text = "".join(f" <{i}>" for i in raw)
    found = find_header(raw)
    if found is not None:
        key, header_end = found
        return _Prompt(key, len(raw) - header_end, raw, text, False)
    return _Prompt(answer_key({"prompt_token_ids": raw}, seed), 0, raw, text, False)


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


def _int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise bad_request(f"{name} must be an integer", name)
    return value


def _requested(body: dict[str, Any], *names: str, zero_ok: bool = False) -> int | None:
    """The first of `names` that is set; below 1 is refused (0 only when `zero_ok`)."""
    for name in names:
        value = _int(body, name)
        if value is None:
            continue
        if value < 1 and not (zero_ok and value == 0):
            raise invalid(name, f"{name} must be at least 1, got {value}.", value)
        return value
    return None


def _n(body: dict[str, Any]) -> int:
    n = _int(body, "n")
    if n is None:
        return 1
    if n < 1:
        raise bad_request(f"n must be at least 1, got {n}.")
    if n > MAX_N_SEQUENCES:
        raise bad_request(
            f"n must be at most {MAX_N_SEQUENCES}, got {n}. To increase this limit, set the "
            "VLLM_MAX_N_SEQUENCES environment variable."
        )
    return n


def _chat_logprobs(body: dict[str, Any]) -> int | None:
    wanted = _bool(body, "logprobs", default=False)
    top = _int(body, "top_logprobs")
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise bad_request(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}", "top_logprobs")
    if top and not wanted:
        raise bad_request(
            "when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs"
        )
    return (top or 0) if wanted else None


def _completion_logprobs(body: dict[str, Any]) -> int | None:
    logprobs = _int(body, "logprobs")
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise bad_request(f"logprobs must be in 0..{MAX_TOP_LOGPROBS}", "logprobs")
    return logprobs


def _seed(body: dict[str, Any]) -> int | None:
    return _int(body, "seed")


def _bool(body: dict[str, Any], name: str, *, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be a boolean", name)
    return value


def _stream_options(body: dict[str, Any], stream: bool) -> tuple[bool, bool]:
    """(include_usage, continuous usage): as vLLM's `should_include_usage`, continuous usage
    only counts together with `include_usage`."""
    options = body.get("stream_options")
    if options is None:
        return False, False
    if not stream:
        raise invalid(
            "stream_options", "Stream options can only be defined when `stream=True`.", None
        )
    if not isinstance(options, dict):
        raise bad_request("stream_options must be an object", "stream_options")
    include = _bool(options, "include_usage", default=False)
    return include, include and _bool(options, "continuous_usage_stats", default=False)
