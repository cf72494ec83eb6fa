"""vLLM's KV-cache event wire format: decoding and encoding, sans-I/O.

A vLLM engine started with ``--kv-events-config`` publishes on a ZeroMQ PUB socket. Each message
is three frames: the topic, the batch's sequence number (8 bytes, big-endian, from 0 per
publisher process) and a msgpack payload ``[timestamp, [event, ...], data_parallel_rank]`` (the
rank may be absent). Each event is a map tagged by ``type``:

- ``BlockStored``: ``block_hashes`` (the engine's hashes of consecutive full blocks),
  ``parent_block_hash`` (the block before the first; nil for a prompt's first block),
  ``token_ids`` (all tokens of those blocks, in order), ``block_size``, ``lora_name``,
  ``medium``, and optional ``extra_keys`` (one entry per block: LoRA, multimodal, cache salt),
  ``group_idx``. A prefix-cache hit re-announces blocks already stored.
- ``BlockRemoved``: ``block_hashes``, ``medium``, optional ``group_idx``.
- ``AllBlocksCleared``: the engine dropped its whole prefix cache.

Engine hashes are 64-bit integers by default, bytes when the engine is told so; both are kept
as they come, opaque. The replay socket (ROUTER) answers a request frame holding a start
sequence number (8 bytes, big-endian) with every buffered batch from there on, each as
``topic, seq, payload``, then an end marker whose sequence frame is -1.

With data parallelism (``--data-parallel-size N`` behind one API server) every engine publishes
on its own sockets: rank r's endpoints are the configured ones with the TCP port raised by r
(`rank_endpoint`). The API server sends a request to the rank its ``X-data-parallel-rank``
header names, else to one its own balancer picks.

The simulator publishes with `encode_batch`, so both sides are tested against one definition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

EngineHash = int | bytes
END_SEQ = (-1).to_bytes(8, "big", signed=True)


class WireError(ValueError):
    """A message that is not a KV-event batch (wrong frames, not msgpack, wrong shape)."""


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: Sequence[EngineHash]
    parent: EngineHash | None
    token_ids: Sequence[int]
    block_size: int
    lora_name: str | None = None
    medium: str | None = None
    extra_keys: Sequence[Any] | None = None
    group: int = 0


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: Sequence[EngineHash]
    medium: str | None = None
    group: int = 0


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


Event = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class Batch:
    seq: int
    ts: float
    events: list[Event]
    rank: int | None = None  # the publishing engine's data-parallel rank, when the payload says


def decode_seq(frame: bytes) -> int:
    if len(frame) != 8:
        raise WireError(f"sequence frame of {len(frame)} bytes, expected 8")
    return int.from_bytes(frame, "big", signed=True)


def encode_seq(seq: int) -> bytes:
    return seq.to_bytes(8, "big", signed=True)


def decode_message(frames: Sequence[bytes]) -> Batch:
    """A published (or replayed) message: ``topic, seq, payload``."""
    if len(frames) != 3:
        raise WireError(f"{len(frames)} frames, expected 3 (topic, seq, payload)")
    ts, events, rank = _decode(frames[2])
    return Batch(decode_seq(frames[1]), ts, events, rank)


def decode_payload(payload: bytes) -> tuple[float, list[Event]]:
    """The batch's timestamp and the events we understand; unknown event types are skipped,
    so a newer vLLM that adds one does not stop the index."""
    ts, events, _ = _decode(payload)
    return ts, events


def _decode(payload: bytes) -> tuple[float, list[Event], int | None]:
    try:
        batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise WireError(f"payload is not msgpack: {exc}") from exc
    if not isinstance(batch, list) or len(batch) < 2 or not isinstance(batch[1], list):
        raise WireError("payload is not [timestamp, [events], rank]")
    events: list[Event] = []
    for raw in batch[1]:
        event = _event(raw)
        if event is not None:
            events.append(event)
    rank = batch[2] if len(batch) > 2 and type(batch[2]) is int else None
    return float(batch[0]), events, rank


def _event(raw: object) -> Event | None:
    if not isinstance(raw, dict):
        raise WireError("an event is not a map")
    kind = raw.get("type")
    try:
        if kind == "BlockStored":
            return BlockStored(
                raw["block_hashes"],
                raw.get("parent_block_hash"),
                raw["token_ids"],
                int(raw["block_size"]),
                raw.get("lora_name"),
                raw.get("medium"),
                raw.get("extra_keys"),
                raw.get("group_idx") or 0,
            )
        if kind == "BlockRemoved":
            return BlockRemoved(raw["block_hashes"], raw.get("medium"), raw.get("group_idx") or 0)
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError(f"malformed {kind} event: {exc!r}") from exc
    if kind == "AllBlocksCleared":
        return AllBlocksCleared()
    return None


def rank_endpoint(endpoint: str, rank: int) -> str:
    """Data-parallel rank ``rank``'s endpoint, as vLLM derives it from the configured one: a TCP
    port raised by the rank (port 0, "any", left alone), an ``inproc`` name suffixed."""
    if rank == 0:
        return endpoint
    if endpoint.startswith("inproc"):
        return f"{endpoint}_dp{rank}"
    head, colon, port = endpoint.rpartition(":")
    if not colon or not port.isdigit() or int(port) == 0:
        return endpoint
    return f"{head}:{int(port) + rank}"


def encode_batch(ts: float, events: Sequence[Event], rank: int = 0) -> bytes:
    """The payload vLLM would publish for these events (fields it omits when unset omitted)."""
    return msgpack.packb([ts, [_encode_event(event) for event in events], rank])  # type: ignore[no-any-return]


def _encode_event(event: Event) -> dict[str, Any]:
    if isinstance(event, BlockStored):
        out: dict[str, Any] = {
            "type": "BlockStored",
            "block_hashes": list(event.block_hashes),
            "parent_block_hash": event.parent,
            "token_ids": list(event.token_ids),
            "block_size": event.block_size,
            "lora_id": None,
            "medium": event.medium,
            "lora_name": event.lora_name,
            "group_idx": event.group,
        }
        if event.extra_keys is not None:
            out["extra_keys"] = list(event.extra_keys)
        return out
    if isinstance(event, BlockRemoved):
        return {
            "type": "BlockRemoved",
            "block_hashes": list(event.block_hashes),
            "medium": event.medium,
            "group_idx": event.group,
        }
    return {"type": "AllBlocksCleared"}
