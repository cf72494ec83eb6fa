"""``make run-vllm``: the gateway on 127.0.0.1:8080 in front of two real CPU vLLM workers.

The workers serve the tiny test model (random weights: the text is gibberish, the protocol is
real) unless ``--model DIR`` names a local model folder (a Hugging Face layout; no hub is
asked). They listen on 8001 and 8002; the gateway's configuration is ``config/vllm.yaml``
with the workers' model name filled in. Ctrl-C stops the gateway and both workers (each
worker's whole process group: vLLM's engine outlives a killed API server).
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from tests.vllm.fleet import MODEL, MODEL_DIR, ROOT, VLLMWorker, start_all

PORTS = (8001, 8002)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MODEL_DIR, help="a local model folder")
    parser.add_argument("--name", default=None, help="served model name (default: folder name)")
    args = parser.parse_args()
    name = args.name or (MODEL if args.model == MODEL_DIR else args.model.name)
    workers = [
        VLLMWorker(f"worker {port}", port=port, model_dir=args.model.resolve(), served_name=name)
        for port in PORTS
    ]
    print(f"starting two vLLM workers for {name!r} on ports {PORTS} (about a minute)...")
    start_all(workers)
    config = yaml.safe_load((ROOT / "config" / "vllm.yaml").read_text())
    config["workers"] = [{"url": w.url, "models": [name]} for w in workers]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as out:
        yaml.safe_dump(config, out)
    print(f"workers up; the gateway serves {name!r} on http://127.0.0.1:8080 (Ctrl-C stops all)")
    try:
        with contextlib.suppress(KeyboardInterrupt):
            subprocess.run([sys.executable, "-m", "gateway", "--config", out.name], check=False)
    finally:
        for worker in workers:
            worker.stop()
        Path(out.name).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
