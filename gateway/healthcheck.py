"""The container's HEALTHCHECK: GET /health on the port the gateway was configured with.

    python -m gateway.healthcheck --config /etc/vllm-gateway/gateway.yaml

The port comes from the same settings file and `VLLM_GATEWAY_*` environment the gateway reads,
so a changed `server.port` moves the check with it. Exit 0 when /health answers 200, else 1.
"""

from __future__ import annotations

import argparse
import http.client
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway.settings import load_settings

TIMEOUT = 2.0  # seconds; below the Dockerfile's --timeout


def healthy(port: int) -> bool:
    """Whether 127.0.0.1:`port` answers GET /health with 200 within `TIMEOUT`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.healthcheck")
    parser.add_argument("--config", type=Path, default=None)
    args = parser.parse_args(argv)
    settings = load_settings(args.config, os.environ)
    return 0 if healthy(settings.server.port) else 1


if __name__ == "__main__":
    sys.exit(main())
