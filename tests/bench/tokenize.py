"""Where cache-aware routing should get a chat prompt's token ids: the worker's ``/tokenize``
or a tokenizer in the gateway. ``python -m tests.bench.tokenize`` (needs ``make vllm``, and
``tokenizers`` and ``jinja2`` in the gateway's venv) starts one CPU vLLM worker on the tiny
model and measures, one request at a time:

- remote: ``POST /tokenize`` with the chat messages (what vLLM renders and encodes itself):
  wall time per call and the caller's CPU per call;
- local: the model's chat template rendered with jinja2 (a sandbox with the options and
  ``tojson`` filter transformers uses) and encoded with ``tokenizers`` (no special tokens added:
  the template carries them, as vLLM does for chat): CPU time per request;

- gateway: `gateway.tokenizer.PromptTokenizer`, the same work with its cache of the text
  between special tokens, on requests that share their system prompt (CPU per request);

and checks that all give the same ids. The tiny model's tokenizer has 2048 tokens; a real
model's (128k) costs more per token: treat the local figures as a lower bound.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from gateway.tokenizer import PromptTokenizer
from tests.vllm.fleet import MODEL, MODEL_DIR, VLLMWorker

RUNS = 300
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "gateway")


def chat(rng: random.Random, words: int, system: str | None = None) -> list[dict[str, str]]:
    """A system prompt of ``words`` words (or the one given) and a short new question."""
    if system is None:
        system = " ".join(rng.choice(WORDS) for _ in range(words))
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": f"question {rng.randrange(10**6)}"},
    ]


class LocalTokenizer:
    def __init__(self, model_dir: Path) -> None:
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        config = json.loads((model_dir / "tokenizer_config.json").read_text())
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent)
        source = (model_dir / "chat_template.jinja").read_text()
        self.template = env.from_string(source)
        self.special = {"bos_token": config["bos_token"], "eos_token": config["eos_token"]}

    def ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.template.render(messages=messages, add_generation_prompt=True, **self.special)
        return self.tokenizer.encode(text, add_special_tokens=False).ids


def quantiles(samples: list[float]) -> str:
    cuts = statistics.quantiles(samples, n=100)
    return f"p50 {cuts[49] * 1e3:.3f} ms, p99 {cuts[98] * 1e3:.3f} ms"


async def remote(url: str, bodies: list[dict[str, Any]]) -> tuple[list[list[int]], str]:
    walls: list[float] = []
    results = []
    async with aiohttp.ClientSession() as session:
        for body in bodies[:20]:  # warm up the connection and the server
            async with session.post(url + "/tokenize", json=body) as response:
                await response.read()
        cpu = time.process_time()
        for body in bodies:
            start = time.perf_counter()
            async with session.post(url + "/tokenize", json=body) as response:
                answer = await response.json()
            walls.append(time.perf_counter() - start)
            results.append(answer["tokens"])
        cpu_per_call = (time.process_time() - cpu) / len(bodies)
    return results, f"{quantiles(walls)}; caller CPU {cpu_per_call * 1e3:.3f} ms per call"


def local(
    ids: Callable[[dict[str, Any]], list[int] | None], bodies: list[dict[str, Any]]
) -> tuple[list[list[int] | None], str]:
    for body in bodies[:20]:
        ids(body)
    times, results = [], []
    for body in bodies:
        start = time.process_time()
        results.append(ids(body))
        times.append(time.process_time() - start)
    return results, quantiles(times)


async def main() -> None:
    worker = VLLMWorker("tokenize-bench")
    worker.start()
    try:
        worker.wait_ready()
        whole = LocalTokenizer(MODEL_DIR)
        for words in (150, 700, 2800):
            rng = random.Random(words)
            system = chat(rng, words)[0]["content"]
            bodies = [{"model": MODEL, "messages": chat(rng, words, system)} for _ in range(RUNS)]
            theirs, remote_line = await remote(worker.url, bodies)
            ours, whole_line = local(lambda body: whole.ids(body["messages"]), bodies)
            ours_cached = PromptTokenizer(MODEL_DIR / "tokenizer.json")
            cached, cached_line = local(ours_cached.chat_ids, bodies)
            same = sum(a == b == c for a, b, c in zip(theirs, ours, cached, strict=True))
            print(
                f"~{len(theirs[0])} tokens: /tokenize {remote_line} | local, whole: CPU"
                f" {whole_line} | gateway, cached pieces: CPU {cached_line}"
                f" | identical ids {same}/{RUNS}"
            )
    finally:
        worker.stop()


if __name__ == "__main__":
    asyncio.run(main())
