"""Builds the tiny model real-vLLM tests serve: random weights, a locally trained tokenizer and
a chat template that renders tools and tool calls.

No model hub is reachable from these machines, and the gateway cares about vLLM's protocol,
not about what the text says. A 2-layer Llama with hidden size 256 (heads of 64, a width the
CPU attention kernels support) and a 2,048-token byte-level BPE vocabulary takes a few seconds
to make and 4 MB on disk. Greedy decoding with a fixed seed is deterministic, which the resume
tests need.

Runs in vLLM's own virtual environment (torch, transformers and tokenizers come with it):
``python tests/vllm/tinymodel.py OUT_DIR``. It writes into a temporary folder and renames it,
so a folder that exists is complete.
"""

from __future__ import annotations

import shutil
import sys
import sysconfig
from pathlib import Path

VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<tool_call>", "</tool_call>"]

# ChatML-like, as Hermes models use: the hermes tool parser looks for <tool_call> tags.
# A final assistant message stays open when add_generation_prompt is false, so
# continue_final_message works.
CHAT_TEMPLATE = """{{- bos_token -}}
{%- if tools -%}
<|system|>Tools: {% for tool in tools %}{{ tool | tojson }}{% endfor %}
{% endif -%}
{%- for message in messages -%}
{%- set open = loop.last and message.role == 'assistant' and not add_generation_prompt -%}
<|{{ message.role }}|>
{%- if message.content is string -%}{{ message.content }}
{%- elif message.content -%}{% for part in message.content %}{{ part.text }}{% endfor %}
{%- endif -%}
{%- if message.tool_calls -%}{% for call in message.tool_calls %}<tool_call>{"name": \
{{ call.function.name | tojson }}, "arguments": {{ call.function.arguments }}}</tool_call>\
{% endfor %}{%- endif -%}
{%- if not open %}</s>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"""


def training_text() -> list[str]:
    """The standard library's sources: plenty of varied text, on every machine."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))[:200]
    return [path.read_text(encoding="utf-8", errors="replace") for path in files]


def build_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<tool_call>", "</tool_call>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def build_model(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        # Wide enough that greedy decoding wanders instead of repeating one token (the default
        # 0.02 gives "setsetset..."): resume tests must see where a continuation went wrong.
        initializer_range=0.2,
        torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)


def build(out: Path) -> Path:
    if (out / "config.json").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build_tokenizer(tmp)
    build_model(tmp)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    print(build(Path(sys.argv[1])))
