"""A simulated vLLM worker for tests and demos: vLLM's HTTP API, SSE streams, errors, metrics
and continuous-batching latencies, with injectable faults and no GPU.

    from gateway.simulator import SimConfig, create_app
"""

from .app import ENGINE, create_app
from .config import FaultSpec, FaultSpecError, SimConfig, parse_fault

__all__ = ["ENGINE", "FaultSpec", "FaultSpecError", "SimConfig", "create_app", "parse_fault"]
