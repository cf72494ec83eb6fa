"""The gateway's own prompt tokenization: the chat template rendered and encoded as vLLM does,
pieces between special tokens cached without changing a single id, requests it cannot render
exactly refused (None), long new text bounded to an exact prefix. Tokenizers are trained here
on a few lines of text, in milliseconds."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from gateway.prompttokens import prompt_token_ids
from gateway.tokenizer import PromptTokenizer, TokenizerError

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a gateway routes every request to the worker that holds its prefix",
    "prefix caching skips the prefill of every cached block",
] * 20
SPECIALS = ["<s>", "</s>", "<pad>"]


def model_dir(tmp_path: Path, metaspace: bool = False, bos_template: bool = True) -> Path:
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    if metaspace:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        tokenizer.decoder = decoders.Metaspace()
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if not metaspace else [],
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    if bos_template:
        bos = tokenizer.token_to_id("<s>")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", bos)]
        )
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": TEMPLATE}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def chat(*contents: str) -> dict[str, object]:
    roles = ["system", "user", "assistant"]
    return {"messages": [{"role": roles[i % 3], "content": c} for i, c in enumerate(contents)]}


def test_chat_ids_are_the_rendered_template_encoded_as_vllm_does(tmp_path: Path) -> None:
    directory = model_dir(tmp_path)
    ours = PromptTokenizer(directory / "tokenizer.json")
    reference = Tokenizer.from_file(str(directory / "tokenizer.json"))
    assert ours.split_exact
    text = "<s><|system|>the lazy dog</s><|user|>a fox?</s><|assistant|>"
    expected = reference.encode(text, add_special_tokens=False).ids
    assert ours.chat_ids(chat("the lazy dog", "a fox?")) == expected
    assert ours.chat_ids(chat("the lazy dog", "a fox?")) == expected  # from the piece cache
    assert expected[0] == reference.token_to_id("<s>")


def test_cached_pieces_never_change_an_id(tmp_path: Path) -> None:
    directory = model_dir(tmp_path)
    ours = PromptTokenizer(directory / "tokenizer.json", cache_pieces=8)  # evictions happen
    reference = Tokenizer.from_file(str(directory / "tokenizer.json"))
    rng = random.Random(7)
    words = [*" ".join(CORPUS).split(), "\n", "  ", "é", "<s>", "</s>", "<|x|>"]
    system = " ".join(rng.choice(words) for _ in range(60))
    for _ in range(200):
        question = "".join(rng.choice(words) + rng.choice(["", " "]) for _ in range(12))
        data = chat(system, question)
        text = f"<s><|system|>{system}</s><|user|>{question}</s><|assistant|>"
        assert ours.chat_ids(data) == reference.encode(text, add_special_tokens=False).ids


def test_requests_it_cannot_render_exactly_are_left_to_the_policy(tmp_path: Path) -> None:
    ours = PromptTokenizer(model_dir(tmp_path) / "tokenizer.json")
    plain = chat("hello")
    assert ours.chat_ids(plain) is not None
    for extra in (
        {"continue_final_message": True},  # with add_generation_prompt left true: vLLM's 400
        {"add_generation_prompt": "no"},
        {"chat_template_kwargs": {"x": 1}},
        {"reasoning_effort": "low"},
        {"documents": [{"title": "a", "text": "b"}]},
        {"chat_template": "{{ messages }}"},
    ):
        assert ours.chat_ids({**plain, **extra}) is None, extra
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
    for message in (
        {"role": "user", "content": [{"type": "text", "text": "hi"}, image]},
        {"role": "developer", "content": "be brief"},
        {"role": "assistant", "content": "hm", "reasoning": "because"},
    ):
        assert ours.chat_ids({"messages": [message]}) is None, message
    assert ours.chat_ids({"messages": []}) is None


def test_continuing_the_final_message_cuts_the_prompt_where_transformers_does(
    tmp_path: Path,
) -> None:
    """``add_generation_prompt: false`` renders without the assistant opener, and
    ``continue_final_message`` ends the prompt right after the final message's text (its last
    text part), before the end-of-turn token the template writes after it."""
    ours = PromptTokenizer(model_dir(tmp_path) / "tokenizer.json")
    reference = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))

    def encoded(text: str) -> list[int]:
        return reference.encode(text, add_special_tokens=False).ids

    data = chat("be brief", "the fox", "the quick ")
    assert ours.chat_ids({**data, "add_generation_prompt": False}) == encoded(
        "<s><|system|>be brief</s><|user|>the fox</s><|assistant|>the quick </s>"
    )
    continued = {**data, "add_generation_prompt": False, "continue_final_message": True}
    # The template keeps the text as it is: the trailing space stays.
    want = encoded("<s><|system|>be brief</s><|user|>the fox</s><|assistant|>the quick ")
    assert ours.chat_ids(continued) == want
    # A template that trims the message: the cut drops the spacing before the tag too.
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = TEMPLATE.replace("{{ m.content }}", "{{ m.content | trim }}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    trimmed = PromptTokenizer(tmp_path / "tokenizer.json")
    assert trimmed.chat_ids(continued) == encoded(
        "<s><|system|>be brief</s><|user|>the fox</s><|assistant|>the quick"
    )
    # No content is the empty text here (vLLM's "string" format): the prompt ends at the opener.
    empty = {**continued, "messages": [*data["messages"][:2], {"role": "assistant"}]}  # type: ignore[index]
    assert ours.chat_ids(empty) == encoded(
        "<s><|system|>be brief</s><|user|>the fox</s><|assistant|>"
    )
    # A template that drops the message: transformers refuses, and so do we.
    config["chat_template"] = TEMPLATE.replace("{{ m.content }}", "")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert PromptTokenizer(tmp_path / "tokenizer.json").chat_ids(continued) is None


def test_tools_and_tool_calls_reach_the_template_as_vllm_passes_them(tmp_path: Path) -> None:
    """The template sees each tool as vLLM dumps it and each call's arguments as an object."""
    directory = model_dir(tmp_path)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for t in tools or [] %}[{{ t | tojson }}]{% endfor %}"
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}"
        "{% for c in m.tool_calls or [] %}({{ c.function.arguments | tojson }}){% endfor %}"
        "{% endfor %}<|assistant|>"
    )
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    ours = PromptTokenizer(directory / "tokenizer.json")
    reference = Tokenizer.from_file(str(directory / "tokenizer.json"))
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    data = {
        "messages": [
            {"role": "user", "content": "the dog"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "lazy", "tool_call_id": "c1"},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "extra": 1}}],
    }
    text = (
        '[{"type": "function", "function": {"name": "f", "description": null, '
        '"parameters": null}}]<|user|>the dog<|assistant|>({"x": 1})<|tool|>lazy<|assistant|>'
    )
    assert ours.chat_ids(data) == reference.encode(text, add_special_tokens=False).ids
    assert call["function"]["arguments"] == '{"x": 1}'  # the forwarded body is untouched


def test_completion_text_gets_the_tokenizer_s_special_tokens(tmp_path: Path) -> None:
    directory = model_dir(tmp_path)
    ours = PromptTokenizer(directory / "tokenizer.json")
    reference = Tokenizer.from_file(str(directory / "tokenizer.json"))
    text = "the quick brown fox"
    assert ours.completion_ids(text) == reference.encode(text).ids
    assert prompt_token_ids({"prompt": text}, ours) == reference.encode(text).ids
    assert prompt_token_ids({"prompt": [text]}, ours) == reference.encode(text).ids
    assert prompt_token_ids({"prompt": text}) is None
    assert prompt_token_ids({"prompt": [5, 6, 7]}) == [5, 6, 7]
    assert prompt_token_ids({"prompt": [[5, 6]]}) == [5, 6]
    assert prompt_token_ids({"prompt": [5, True]}) is None
    assert prompt_token_ids(chat("hi")) is None
    assert prompt_token_ids(chat("hi"), ours) == ours.chat_ids(chat("hi"))


def test_new_text_is_bounded_to_an_exact_prefix(tmp_path: Path) -> None:
    directory = model_dir(tmp_path)
    reference = Tokenizer.from_file(str(directory / "tokenizer.json"))
    ours = PromptTokenizer(directory / "tokenizer.json", max_new_chars=40)
    first, second = "the quick brown fox " * 1, "the lazy dog " * 10
    ids = ours.chat_ids(chat(first, second))
    whole = reference.encode(
        f"<s><|system|>{first}</s><|user|>{second}</s><|assistant|>", add_special_tokens=False
    ).ids
    assert ids is not None
    assert 0 < len(ids) < len(whole)
    assert whole[: len(ids)] == ids  # the second message did not fit: it stops before it


def test_a_document_longer_than_the_bound_is_matched_by_its_head(tmp_path: Path) -> None:
    """A piece longer than max_new_chars is encoded up to there (less the tokens at the cut)
    and cached: the ids are an exact prefix, the same for every question after it."""
    directory = model_dir(tmp_path)
    reference = Tokenizer.from_file(str(directory / "tokenizer.json"))
    ours = PromptTokenizer(directory / "tokenizer.json", max_new_chars=200)
    document = "a gateway routes every request to the worker that holds its prefix " * 10
    first = ours.chat_ids(chat(document, "a fox?"))
    again = ours.chat_ids(chat(document, "a dog?"))
    whole = reference.encode(
        f"<s><|system|>{document}</s><|user|>a fox?</s><|assistant|>", add_special_tokens=False
    ).ids
    assert first == again
    assert first is not None
    assert 20 < len(first) < len(whole)
    assert whole[: len(first)] == first


def test_a_long_new_piece_nobody_holds_is_not_encoded(tmp_path: Path) -> None:
    """With a probe (the KV index), the head of a long new piece is encoded first: when no
    worker holds its blocks, the rest is not encoded (nothing after it could match) nor cached;
    when the probe cannot tell or says yes, everything is."""
    directory = model_dir(tmp_path)
    reference = Tokenizer.from_file(str(directory / "tokenizer.json"))
    ours = PromptTokenizer(directory / "tokenizer.json")
    asked: list[tuple[int, int]] = []
    answer: list[bool | None] = [False]

    def probe(ids: list[int], after: int) -> bool | None:
        asked.append((len(ids), after))
        return answer[0]

    ours.probe = probe
    document = "the quick brown fox jumps over the lazy dog " * 40  # > PROBE_CHARS
    data = chat(document, "a fox?")
    whole = reference.encode(
        f"<s><|system|>{document}</s><|user|>a fox?</s><|assistant|>", add_special_tokens=False
    ).ids
    short = ours.chat_ids(data)
    assert short == whole[:1]  # the bos token before the unheld piece
    assert asked == [(asked[0][0], 1)]
    other = "a second document, which the probe cannot tell about " * 30
    other_whole = reference.encode(
        f"<s><|system|>{other}</s><|user|>a fox?</s><|assistant|>", add_special_tokens=False
    ).ids
    answer[0] = None
    assert ours.chat_ids(chat(other, "a fox?")) == other_whole
    assert len(asked) == 2
    answer[0] = False
    assert ours.chat_ids(chat(other, "a fox?")) == other_whole  # cached: no question asked
    assert len(asked) == 2


def test_a_long_piece_nobody_holds_is_encoded_when_it_comes_again(tmp_path: Path) -> None:
    """Probing costs an encoding of the head each time: a piece found unheld once is encoded
    and cached on its second sight, not probed on every request (as a system prompt that no
    worker holds yet, or ever, would be)."""
    directory = model_dir(tmp_path)
    reference = Tokenizer.from_file(str(directory / "tokenizer.json"))
    ours = PromptTokenizer(directory / "tokenizer.json")
    asked: list[int] = []

    def probe(ids: list[int], after: int) -> bool | None:
        asked.append(after)
        return False

    ours.probe = probe
    document = "the quick brown fox jumps over the lazy dog " * 40  # > PROBE_CHARS
    whole = reference.encode(
        f"<s><|system|>{document}</s><|user|>a fox?</s><|assistant|>", add_special_tokens=False
    ).ids
    assert ours.chat_ids(chat(document, "a fox?")) == whole[:1]
    assert ours.chat_ids(chat(document, "a fox?")) == whole
    assert ours.chat_ids(chat(document, "a fox?")) == whole
    assert asked == [1]
    other = "a different document that no worker holds either, " * 30
    assert ours.chat_ids(chat(other, "a fox?")) == whole[:1]
    assert asked == [1, 1]


def test_a_tokenizer_that_does_not_split_cleanly_is_encoded_whole(tmp_path: Path) -> None:
    """SentencePiece-style: a piece's first word gets a prefix space only at the start of the
    whole text, so pieces encoded alone would differ; the self-check sees it."""
    directory = model_dir(tmp_path, metaspace=True, bos_template=False)
    ours = PromptTokenizer(directory / "tokenizer.json")
    reference = Tokenizer.from_file(str(directory / "tokenizer.json"))
    assert not ours.split_exact
    text = "<s><|system|>the lazy dog</s><|user|>a fox</s><|assistant|>"
    assert (
        ours.chat_ids(chat("the lazy dog", "a fox"))
        == reference.encode(text, add_special_tokens=False).ids
    )


def test_a_directory_without_a_tokenizer_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=str(tmp_path)):
        PromptTokenizer(tmp_path / "tokenizer.json")
