"""Resuming a chat stream on another worker mid-answer, with vLLM's ``continue_final_message``.

Three pure pieces; the proxy decides when and sends the request:
- ``resumable_request``: whether a request may be resumed at all (a chat stream, one choice,
  no tools, no logprobs).
- ``Transcript``: what the client has been sent so far (fed the bytes actually written, so it
  is exact): the stream's ``id``/``created``/``model``, the answer's text, how many token
  chunks carried it, whether a tool call or reasoning makes a continuation unfaithful.
- ``Splice``: turns the continuation's stream into more chunks of the original one: same
  ``id``, ``created`` and ``model``, no second role chunk, usage that adds both parts up (the
  prompt once, completion tokens summed), then ``[DONE]``.

A continuation asks for the original messages plus the partial answer as a final assistant
message, ``continue_final_message: true``, ``add_generation_prompt: false``, and ``max_tokens``
reduced by what was already produced. A worker with the same model and tokenizer then writes
the rest of the same answer.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.sse import SSEDecoder

DONE = b"data: [DONE]\n\n"
_TOKEN_LIMIT_FIELDS = ("max_completion_tokens", "max_tokens")


def resumable_request(data: dict[str, Any]) -> bool:
    """A chat stream with one choice and nothing a continuation cannot reproduce."""
    if data.get("n") not in (None, 1) or data.get("logprobs") or data.get("top_logprobs"):
        return False
    if data.get("tools") or data.get("functions"):
        return False
    return isinstance(data.get("messages"), list)


def worker_fault(error: dict[str, object]) -> bool:
    """An in-band error event the worker is to blame for (not the request's fault)."""
    inner = error.get("error")
    body = inner if isinstance(inner, dict) else error
    code = body.get("code")
    if isinstance(code, int):
        return code >= 500
    return body.get("type") not in ("invalid_request_error", "BadRequestError")


class Transcript:
    """The stream as the client has seen it: fed the exact bytes written to the client."""

    def __init__(self) -> None:
        self._decoder = SSEDecoder()
        self.header: dict[str, Any] = {}  # id, created, model of the original stream
        self.content: list[str] = []
        self.reasoning = False
        self.tool_calls = False
        self.tokens = 0  # chunks that carried answer text: one token each, as vLLM streams
        self.finished = False

    @property
    def resumable(self) -> bool:
        # Mid-reasoning or mid-tool-call, a continuation cannot be made faithful.
        return bool(self.header) and not (self.reasoning or self.tool_calls or self.finished)

    def feed(self, data: bytes) -> None:
        for event in self._decoder.feed(data):
            if event.comment_only or event.data == "[DONE]":
                continue
            try:
                body = orjson.loads(event.data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(body, dict):
                self._observe(body)

    def _observe(self, body: dict[str, Any]) -> None:
        if not self.header and isinstance(body.get("id"), str):
            self.header = {k: body[k] for k in ("id", "created", "model") if k in body}
        for choice in body.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            if choice.get("finish_reason") is not None:
                self.finished = True
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                continue
            if delta.get("tool_calls"):
                self.tool_calls = True
            if delta.get("reasoning") or delta.get("reasoning_content"):
                self.reasoning = True
            text = delta.get("content")
            if isinstance(text, str) and text:
                self.content.append(text)
                self.tokens += 1

    def continuation(self, original: bytes) -> bytes:
        """The request that makes another worker write the rest of the answer."""
        data = orjson.loads(original)
        partial = {"role": "assistant", "content": "".join(self.content)}
        data["messages"] = [*data["messages"], partial]
        data["continue_final_message"] = True
        data["add_generation_prompt"] = False
        data["stream"] = True
        data["stream_options"] = {"include_usage": True}
        for name in _TOKEN_LIMIT_FIELDS:
            limit = data.get(name)
            if isinstance(limit, int) and not isinstance(limit, bool):
                data[name] = max(limit - self.tokens, 1)
        return orjson.dumps(data)


class Splice:
    """Rewrites one continuation stream into chunks of the original stream."""

    def __init__(self, transcript: Transcript, client_wants_usage: bool) -> None:
        self._decoder = SSEDecoder()
        self._header = transcript.header
        self._before = transcript.tokens
        self._wants_usage = client_wants_usage
        self.first_token = False
        self.finish_reason: str | None = None
        self.done = False
        self.usage: dict[str, int] | None = None

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to send to the client for this chunk of the continuation."""
        out: list[bytes] = []
        for event in self._decoder.feed(chunk):
            if event.comment_only or self.done:
                continue
            if event.data.strip() == "[DONE]":
                self.done = True
                out.append(DONE)
                continue
            body = orjson.loads(event.data)  # the caller has checked the event is JSON
            rewritten = self._rewrite(body) if isinstance(body, dict) else None
            if rewritten is not None:
                out.append(b"data: " + orjson.dumps(rewritten) + b"\n\n")
        return b"".join(out)

    def combined_usage(self, usage: dict[str, Any]) -> dict[str, int]:
        """The continuation's prompt held the partial answer: count those tokens as completion."""
        prompt = max(int(usage.get("prompt_tokens", 0)) - self._before, 0)
        completion = int(usage.get("completion_tokens", 0)) + self._before
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}  # fmt: skip

    def _rewrite(self, body: dict[str, Any]) -> dict[str, Any] | None:
        if body.get("error") is not None:
            self.first_token = True
            return body  # the continuation failed in-band: the client gets its error
        usage = body.get("usage")
        if isinstance(usage, dict):
            self.usage = self.combined_usage(usage)
        choices = body.get("choices")
        if not choices:
            if self.usage is None or not self._wants_usage:
                return None
            return {**body, **self._header, "usage": self.usage}
        kept = [c for c in (self._choice(c) for c in choices) if c is not None]
        if not kept:
            return None  # the continuation's role chunk: the client had one already
        body = {**body, **self._header, "choices": kept}
        body.pop("usage", None)
        return body

    def _choice(self, choice: Any) -> Any:
        if not isinstance(choice, dict):
            return choice
        delta = choice.get("delta")
        if isinstance(delta, dict) and "role" in delta:
            delta = {k: v for k, v in delta.items() if k != "role"}
            choice = {**choice, "delta": delta}
        reason = choice.get("finish_reason")
        if isinstance(reason, str):
            self.finish_reason = reason
        has_text = isinstance(delta, dict) and any(v for v in delta.values())
        if has_text:
            self.first_token = True
        if not has_text and reason is None:
            return None
        return choice
