"""The prompt's token ids for cache-aware routing (`balancer.CacheAware`), as the worker will
run them.

A completions prompt given as token ids (one prompt: a list of integers, or a list holding one
such list) is taken as is: vLLM runs exactly those ids. A text prompt or chat messages need the
model's tokenizer (`tokenizer.PromptTokenizer`, when configured for the model); without one,
or for a request it cannot render exactly, None: the configured policy routes it.
"""

from __future__ import annotations

from typing import Any, Protocol


class Tokenizes(Protocol):
    def chat_ids(self, data: dict[str, Any]) -> list[int] | None: ...

    def completion_ids(self, prompt: str) -> list[int]: ...


def prompt_token_ids(data: dict[str, Any], tokenizer: Tokenizes | None = None) -> list[int] | None:
    if "messages" in data:
        return tokenizer.chat_ids(data) if tokenizer is not None else None
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], list | str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer.completion_ids(prompt) if tokenizer is not None and prompt else None
    if not isinstance(prompt, list) or not prompt:
        return None
    if all(type(token) is int for token in prompt):
        return prompt
    return None
