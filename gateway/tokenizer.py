"""A model's prompt token ids computed in the gateway, as vLLM computes them, for cache-aware
routing: the model's own tokenizer files (``tokenizer.json`` for HF ``tokenizers``; beside it,
the chat template from ``chat_template.jinja`` or ``tokenizer_config.json``, rendered with
jinja2 in a sandbox configured as transformers configures it).

- chat: the template rendered with ``add_generation_prompt`` (or, with
  ``continue_final_message``, cut after the final message's text as transformers cuts it),
  encoded without adding special tokens (the template writes them), which is what vLLM does
  for ``/v1/chat/completions``;
- completions text: encoded with the tokenizer's own special tokens added.

Only requests whose rendering we can reproduce exactly are tokenized: text messages, with
function tools, tool calls and tool results, rebuilt as vLLM hands them to the template
(``chatrender``), and of the template's arguments only ``add_generation_prompt`` and
``continue_final_message`` set by the request. Anything else returns None
and the configured policy routes it; a wrong guess could only cost a cache miss, never a wrong
answer.

Cost. Encoding is the expensive part (about 0.6 us per token here, holding the GIL), and
prompts repeat: a system prompt, the earlier turns of a conversation. The tokenizer splits the
text at its special tokens before anything else, so the text between two of them is encoded on
its own; those pieces are cached (LRU), and a request pays only for text it has not seen. When
the tokenizer does not split that way (a normalizer or pre-tokenizer that looks at where a piece
starts), a self-check at load time finds it and every prompt is encoded whole. New text is
encoded up to ``max_new_chars`` per request; the ids stop at the last piece encoded, an exact
prefix of the prompt, so a long cold prompt costs a bounded time on the loop.
"""

from __future__ import annotations

import json
import re
from array import array
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from gateway.chatrender import content_format, conversation

MAX_NEW_CHARS = 16_384
CACHE_PIECES = 4096
CACHE_CHARS = 8_000_000  # the piece cache's text, at most (ids are kept as 4-byte arrays)
CUT_MARGIN = 8  # tokens dropped at a cut through text encoded whole
PROBE_CHARS = 1024  # the head of a new long piece encoded first, to ask whether anyone holds it
# The named special tokens transformers passes to every chat template.
_NAMED_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_SELF_CHECK = ("hello{0} world", "{0}x{0} y\n z", " a\n\n{0}\tb", "{0}{0}c")


class TokenizerError(ValueError):
    """The model directory has no usable tokenizer or chat template."""


class PromptTokenizer:
    def __init__(
        self,
        tokenizer_file: Path,
        max_new_chars: int = MAX_NEW_CHARS,
        cache_pieces: int = CACHE_PIECES,
    ) -> None:
        """Reads ``tokenizer_file`` (a ``tokenizer.json``) and the chat template and special
        tokens beside it (blocking: call it off the event loop)."""
        model_dir = tokenizer_file.parent
        try:
            self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
            config = _read_config(model_dir)
            source = _template_source(model_dir, config)
            self._template = _compile(source)
        except Exception as exc:  # tokenizers raises plain Exceptions for a bad file
            raise TokenizerError(f"{tokenizer_file}: {exc}") from exc
        self._special = {
            name: _token_text(config[name])
            for name in _NAMED_TOKENS
            if config.get(name) is not None
        }
        self._format = content_format(self._template.environment, source)
        self._source = source
        added = self._tokenizer.get_added_tokens_decoder().values()
        specials = sorted((t.content for t in added if t.special), key=len, reverse=True)
        self._ids = {text: self._tokenizer.token_to_id(text) for text in specials}
        self._split = (
            re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
        )
        around = self._tokenizer.encode("x", add_special_tokens=True).ids
        plain = self._tokenizer.encode("x", add_special_tokens=False).ids
        start = _find(around, plain)
        self._added_before, self._added_after = around[:start], around[start + len(plain) :]
        self._max_new = max_new_chars
        self._cache: OrderedDict[str, array[int]] = OrderedDict()
        self._cache_size = cache_pieces
        self._cache_chars = 0
        # Whether some worker holds the last full block of these ids (set by the app from the
        # KV index): a new long piece whose head nobody holds is not worth encoding, since no
        # block after it can match; the first time it is seen. A piece seen again is encoded
        # and cached: it repeats, so the worker it goes to will hold it, and probing it on
        # every request cost more than encoding it once (about 250 us against 60 for the
        # whole prompt from the cache, a 1.3k-token chat prompt on the tiny model).
        self.probe: Callable[[list[int], int], bool | None] | None = None
        self._probed: OrderedDict[int, None] = OrderedDict()  # hashes of pieces found unheld
        self.split_exact = bool(specials) and all(
            self._pieces(probe.format(specials[-1]), len(probe) + 99)
            == self._tokenizer.encode(probe.format(specials[-1]), add_special_tokens=False).ids
            for probe in _SELF_CHECK
        )
        self._cache.clear()
        self._cache_chars = 0

    def chat_ids(self, data: dict[str, Any]) -> list[int] | None:
        prompt = _prompt_arguments(data)
        if prompt is None:
            return None
        add_generation_prompt, continued = prompt
        rebuilt = conversation(data, self._format)
        if rebuilt is None:
            return None
        messages, tools = rebuilt
        final = None
        if continued:
            if "content" not in self._source:
                return None  # transformers refuses: vLLM answers 400
            final = _tag_final(messages)
            if final is None:
                return None
        try:
            # What transformers passes (messages, tools, documents, add_generation_prompt, the
            # named special tokens) and what vLLM adds for a chat completion when the template
            # reads it (reasoning_effort, None unless the request sets it).
            text = self._template.render(
                messages=messages,
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                reasoning_effort=None,
                **self._special,
            )
        except jinja2.TemplateError:
            return None
        if final is None:
            return self._encode(text)
        cut = _cut_at_tag(text, final)
        return self._encode(cut) if cut is not None else None

    def completion_ids(self, prompt: str) -> list[int]:
        ids = self._encode(prompt)
        return [*self._added_before, *ids, *self._added_after]

    def _encode(self, text: str) -> list[int]:
        if self.split_exact:
            return self._pieces(text, self._max_new)
        if len(text) <= self._max_new:
            return self._tokenizer.encode(text, add_special_tokens=False).ids
        cut = self._tokenizer.encode(text[: self._max_new], add_special_tokens=False).ids
        return cut[:-CUT_MARGIN]  # the tokens at the cut may differ from the whole text's

    def _pieces(self, text: str, left: int) -> list[int]:
        """Encodes piece by piece between special tokens, new pieces up to ``left`` chars.

        A piece longer than ``max_new_chars`` (a long document) is encoded up to there, less
        the tokens at the cut, and the ids stop after it: a prefix of the prompt that is exact
        and that the cache can hold, so a long shared document is matched from its second use.
        """
        assert self._split is not None
        ids: list[int] = []
        for piece in self._split.split(text):
            if not piece:
                continue
            special = self._ids.get(piece)
            if special is not None:
                ids.append(special)
                continue
            cut = len(piece) > self._max_new
            key = piece[: self._max_new] if cut else piece
            cached = self._cache.get(key)
            if cached is None and self._unheld(ids, key):
                break
            if cached is None:
                left -= len(key)
                if left < 0:
                    break
                encoded = self._tokenizer.encode(key, add_special_tokens=False).ids
                cached = array("I", encoded[:-CUT_MARGIN] if cut else encoded)
                self._remember(key, cached)
            else:
                self._cache.move_to_end(key)
            ids.extend(cached)
            if cut:
                break
        return ids

    def _unheld(self, ids: list[int], piece: str) -> bool:
        """True when nobody holds the blocks that the head of this new piece would complete,
        and the piece has not been found so before (see ``probe``)."""
        if self.probe is None or len(piece) <= PROBE_CHARS:
            return False
        seen = hash(piece)
        if seen in self._probed:
            del self._probed[seen]
            return False
        head = self._tokenizer.encode(piece[:PROBE_CHARS], add_special_tokens=False).ids
        if self.probe(ids + head[:-CUT_MARGIN], len(ids)) is not False:
            return False
        self._probed[seen] = None
        if len(self._probed) > self._cache_size:
            self._probed.popitem(last=False)
        return True

    def _remember(self, piece: str, ids: array[int]) -> None:
        self._cache[piece] = ids
        self._cache_chars += len(piece)
        while len(self._cache) > self._cache_size or self._cache_chars > CACHE_CHARS:
            old, _ = self._cache.popitem(last=False)
            self._cache_chars -= len(old)


def _prompt_arguments(data: dict[str, Any]) -> tuple[bool, bool] | None:
    """``add_generation_prompt`` and ``continue_final_message`` as vLLM passes them to the
    template; None when the request sets what we do not reproduce (its own template or
    template arguments, documents, a reasoning effort) or what vLLM refuses (both true)."""
    for name in ("documents", "chat_template", "chat_template_kwargs", "reasoning_effort"):
        if data.get(name) is not None:
            return None
    add = data.get("add_generation_prompt", True)
    continued = data.get("continue_final_message", False)
    if type(add) is not bool or type(continued) is not bool or (add and continued):
        return None
    return add, continued


# What transformers (5.x) appends to the final message's text when asked to continue it: the
# rendered prompt is cut where the tag lands, so whatever the template writes after the
# message (an end-of-turn token) is left out.
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _tag_final(messages: list[dict[str, Any]]) -> str | None:
    """Appends the tag to the last message's text (its last text part when it has parts), as
    transformers does; the text it continued, or None when there is none to continue."""
    if not messages:
        return None
    last = messages[-1] = dict(messages[-1])
    content = last.get("content")
    if isinstance(content, str):
        last["content"] = content + CONTINUE_TAG
        return content
    if isinstance(content, list):
        parts = last["content"] = list(content)
        for i in range(len(parts) - 1, -1, -1):
            part = parts[i]
            if isinstance(part, dict) and "text" in part:
                parts[i] = {**part, "text": str(part["text"]) + CONTINUE_TAG}
                return str(part["text"])
    return None


def _cut_at_tag(text: str, final: str) -> str | None:
    """The rendered prompt up to the tag, as transformers cuts it (the spacing before it
    trimmed when the template trimmed the tag's own); None when the template dropped the
    message or the tag (transformers refuses)."""
    tag = CONTINUE_TAG.strip()
    if final.strip() not in text or tag not in text:
        return None
    at = text.rindex(tag)
    if text[at : at + len(CONTINUE_TAG)] == CONTINUE_TAG:
        return text[:at]
    return text[:at].rstrip()


def _read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "tokenizer_config.json"
    if not path.exists():
        return {}
    config = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise TokenizerError("tokenizer_config.json is not an object")
    return config


def _template_source(model_dir: Path, config: dict[str, Any]) -> str:
    path = model_dir / "chat_template.jinja"
    if path.exists():
        return path.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not isinstance(template, str):
        raise TokenizerError("no chat template (chat_template.jinja or tokenizer_config.json)")
    return template


def _compile(source: str) -> jinja2.Template:
    """As transformers compiles chat templates (trim_blocks, lstrip_blocks, loop controls, its
    tojson, raise_exception and strftime_now), in an immutable sandbox."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _tojson(
    value: object,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _token_text(token: object) -> str:
    if isinstance(token, dict):  # a serialised AddedToken
        return str(token.get("content", ""))
    return str(token)


def _find(haystack: list[int], needle: list[int]) -> int:
    for start in range(len(haystack) - len(needle) + 1):
        if haystack[start : start + len(needle)] == needle:
            return start
    raise TokenizerError("the tokenizer's special tokens wrap text in a way we cannot separate")
