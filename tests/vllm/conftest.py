"""Two real CPU vLLM workers for the whole session, and helpers to talk to them directly.

``plain`` streams one token per chunk as vLLM does by default; ``chunky`` runs with
``--stream-interval 3`` (several tokens in one chunk, as vLLM also does on its own when its API
server falls behind). A test that kills a worker leaves it dead; the ``vllm`` fixture restarts
any worker that was signalled or is not healthy before the next test, so each test starts with
both up. (A worker whose engine was killed may still pass /health for a while: a test that
started on it failed over to the other worker before its own kill, and saw no resume.)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.processes import free_port
from tests.vllm.fleet import MODEL, VLLMWorker, start_all

# Every test here may wait for a worker to start (up to 4 minutes on a loaded machine) before
# its own work, which has its own shorter bounds.
pytestmark = pytest.mark.timeout(300)


@dataclass
class VLLMFleet:
    plain: VLLMWorker
    chunky: VLLMWorker

    @property
    def workers(self) -> tuple[VLLMWorker, VLLMWorker]:
        return (self.plain, self.chunky)

    def revive(self) -> None:
        dead = [w for w in self.workers if w.doomed or not (w.running and w.healthy())]
        for worker in dead:
            worker.stop()
            worker.start()
        for worker in dead:
            worker.wait_ready()


@pytest.fixture(scope="session")
def vllm_session() -> Iterator[VLLMFleet]:
    # chunky gets the lower port, so the lower URL: round-robin picks it first, which makes it
    # the worker a resume test kills.
    low, high = sorted((free_port(), free_port()))  # never the same port twice
    fleet = VLLMFleet(
        plain=VLLMWorker("plain", port=high),
        chunky=VLLMWorker("chunky", ["--stream-interval", "3"], port=low),
    )
    start_all(fleet.workers)
    yield fleet
    for worker in fleet.workers:
        worker.stop()


@pytest.fixture
def vllm(vllm_session: VLLMFleet) -> VLLMFleet:
    vllm_session.revive()
    return vllm_session


def worker_entry(worker: VLLMWorker) -> dict[str, Any]:
    return {"url": worker.url, "models": [MODEL]}
