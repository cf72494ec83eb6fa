"""The gateway's own OpenAPI document, served at ``/openapi.json``.

STUB: being written.
"""

from __future__ import annotations

from typing import Any


def document() -> dict[str, Any]:
    return {"openapi": "3.1.0", "info": {"title": "vllm-gateway", "version": "0.1.0"}, "paths": {}}
