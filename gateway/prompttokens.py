"""The prompt's token ids where the gateway knows them without a tokenizer, for cache-aware
routing (`balancer.CacheAware`).

Today that is a completions prompt given as token ids (one prompt: a list of integers, or a
list holding one such list): vLLM runs exactly those ids, so they are what its KV-cache events
report. Text prompts and chat messages need the model's tokenizer and chat template, or the
worker's ``/tokenize``; until then such requests are routed by the configured policy.
"""

from __future__ import annotations

from typing import Any


def prompt_token_ids(data: dict[str, Any]) -> list[int] | None:
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], list):
        prompt = prompt[0]
    if not isinstance(prompt, list) or not prompt:
        return None
    if all(type(token) is int for token in prompt):
        return prompt
    return None
