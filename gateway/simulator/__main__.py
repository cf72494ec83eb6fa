"""Command line: run one simulated vLLM worker, e.g.

    python -m gateway.simulator --port 8001 --model sim-model --fault slow_first_token=1

The defaults look like a small real model (20 ms to first token, 10 ms per token, 64 tokens),
so `curl -N` shows tokens arriving one by one.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from .app import create_app
from .config import FaultSpec, FaultSpecError, SimConfig, parse_fault
from .once import Claims

log = logging.getLogger("gateway.simulator")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.simulator", description="A simulated vLLM worker."
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1")
    add("--port", type=int, default=8000)
    add("--model", action="append", help="served model name; repeat for more (sim-model)")
    add("--max-num-seqs", type=int, default=32, help="batch slots")
    add("--ttft", type=float, default=0.02, help="seconds to first token, before prefill")
    add("--prefill-per-token", type=float, default=0.0001, help="prefill seconds per token")
    add("--itl", type=float, default=0.01, help="seconds between tokens, alone in the batch")
    add("--itl-per-seq", type=float, default=0.0005, help="extra seconds per running request")
    add("--kv-cache-tokens", type=int, default=200_000)
    add("--max-model-len", type=int, default=8192)
    add("--default-max-tokens", type=int, default=64, help="answer length without max_tokens")
    add("--embedding-dim", type=int, default=16)
    add("--fault", help="fault spec applied to every request, e.g. 'status=503' or 'cut_after=3'")
    add(
        "--claims-dir",
        type=Path,
        help="a directory shared by a fleet's workers, so a 'once' fault strikes one attempt",
    )
    add("--sse-keep-alive", type=float, help="seconds between ': keep-alive' comments")
    add("--max-num-queued-reqs", type=int, help="admission control: 503 beyond this queue")
    add("--prefix-cache-blocks", type=int, default=0, help="prefix cache blocks; 0 disables it")
    add("--block-tokens", type=int, default=16, help="tokens per prefix cache block")
    add("--slowdown", type=float, default=1.0, help="multiplies every latency (3 = 3x slower)")
    add("--stream-interval", type=int, default=1, help="tokens per stream chunk, as vLLM's flag")
    add("--kv-events-endpoint", help="publish KV-cache events here, e.g. tcp://*:5557")
    add("--kv-events-replay-endpoint", help="serve event replay here, e.g. tcp://*:5558")
    add("--kv-events-topic", default="", help="topic of the published events")
    add("--tokenizer", help="a model's tokenizer.json: the prefix cache holds its token ids")
    add(
        "--data-parallel-size",
        type=int,
        default=1,
        help="engines behind this address, each with its own prefix cache and publisher",
    )
    add("--log-level", default="INFO")
    return parser


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """Raises `ValueError` (incl. `FaultSpecError`) for inconsistent or invalid values."""
    fault: FaultSpec | None = parse_fault(args.fault) if args.fault else None
    return SimConfig(
        models=tuple(args.model or ["sim-model"]),
        max_num_seqs=args.max_num_seqs,
        ttft_base=args.ttft,
        prefill_per_token=args.prefill_per_token,
        itl_base=args.itl,
        itl_per_seq=args.itl_per_seq,
        kv_cache_tokens=args.kv_cache_tokens,
        max_model_len=args.max_model_len,
        default_max_tokens=args.default_max_tokens,
        embedding_dim=args.embedding_dim,
        fault=fault,
        sse_keep_alive=args.sse_keep_alive,
        max_num_queued_reqs=args.max_num_queued_reqs,
        prefix_cache_blocks=args.prefix_cache_blocks,
        block_tokens=args.block_tokens,
        slowdown=args.slowdown,
        stream_interval=args.stream_interval,
        kv_events_endpoint=args.kv_events_endpoint,
        kv_events_replay_endpoint=args.kv_events_replay_endpoint,
        kv_events_topic=args.kv_events_topic,
        tokenizer=args.tokenizer,
        data_parallel_size=args.data_parallel_size,
    )


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop  # optional speed-up
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except FaultSpecError as exc:
        parser.error(f"--fault: {exc}")
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")
    log.info(
        "simulated vLLM worker on http://%s:%d serving %s "
        "(max_num_seqs=%d, prefix_cache_blocks=%d, slowdown=%g, fault=%s)",
        args.host,
        args.port,
        ", ".join(config.models),
        config.max_num_seqs,
        config.prefix_cache_blocks,
        config.slowdown,
        args.fault or "none",
    )
    web.run_app(
        create_app(config, claims=Claims(args.claims_dir)),
        host=args.host,
        port=args.port,
        handler_cancellation=True,
        access_log=None,
        print=None,
        loop=new_loop(),
    )


if __name__ == "__main__":
    main()
