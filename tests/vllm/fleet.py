"""Real CPU vLLM workers for tests: built, started, signalled and stopped here.

vLLM comes from its own virtual environment (``make vllm`` builds ``.cache/vllm-venv``,
pinned), the model from ``tinymodel.py``. Each worker runs in its own process group: vLLM's API
server spawns an engine core and a worker process, and a SIGKILL of the API server alone
leaves them running (about 2 GB) for good, so ``stop`` kills the whole group.

Everything here is synchronous and polls with a deadline, like ``tests/processes.py``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from tests.processes import HOST, Proc, free_port, http_status, poll_until

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache"
VENV = Path(os.environ.get("VLLM_VENV", CACHE / "vllm-venv"))
PYTHON = VENV / "bin" / "python"
MODEL_DIR = CACHE / "tiny-model"
MODEL = "tiny"
MAX_MODEL_LEN = 1024
# Start to first answer measured 34-55 s eager on these 2 cores, one worker at a time;
# two starting together share the cores.
START_TIMEOUT = 240.0

ENV = {
    "VLLM_TARGET_DEVICE": "cpu",  # the launcher's version answer hides the "+cpu" build tag
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_CACHE_ROOT": str(CACHE / "vllm-cache"),
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_LOGGING_LEVEL": "WARNING",
    # Stored responses (/v1/responses with store: true) live in the server's memory.
    "VLLM_ENABLE_RESPONSES_API_STORE": "1",
}


def require_vllm() -> None:
    if not PYTHON.exists():
        raise AssertionError(
            f"vLLM's virtual environment is missing ({VENV}): `make vllm` builds it "
            "(`make test` does that itself)"
        )


def build_model() -> Path:
    """The tiny model, built once per machine into ``.cache/tiny-model``."""
    require_vllm()
    if not (MODEL_DIR / "config.json").exists():
        subprocess.run(
            [str(PYTHON), str(Path(__file__).with_name("tinymodel.py")), str(MODEL_DIR)],
            check=True,
            capture_output=True,
            timeout=300,
        )
    return MODEL_DIR


class VLLMWorker:
    """One ``vllm serve`` of the tiny model on its own port and process group."""

    def __init__(
        self,
        name: str,
        args: Sequence[str] = (),
        port: int | None = None,
        model_dir: Path = MODEL_DIR,
        served_name: str = MODEL,
    ) -> None:
        self.name = name
        self.args = tuple(args)
        self.model_dir = model_dir
        self.served_name = served_name
        self.port = port or free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.proc: Proc | None = None
        # Signalled or killed by a test: dying, even while /health still answers 200 (an API
        # server notices a dead engine only after a while), so the next test must restart it.
        self.doomed = False

    def command(self) -> list[str]:
        launcher = Path(__file__).with_name("launch.py")
        return [
            str(PYTHON), str(launcher), "serve", str(self.model_dir),
            "--served-model-name", self.served_name,
            "--host", HOST, "--port", str(self.port),
            "--max-model-len", str(MAX_MODEL_LEN),
            # float32, not bf16: greedy decoding on two workers must agree token for token,
            # and a resumed stream re-reads the answer as a prompt (prefill, not decode).
            "--dtype", "float32",
            "--enforce-eager",  # starts 20 s sooner than compiled
            "--seed", "0",
            "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
            *self.args,
        ]  # fmt: skip

    def start(self) -> None:
        """Start without waiting; ``wait_ready`` waits."""
        require_vllm()
        if self.model_dir == MODEL_DIR:
            build_model()
        self.proc = Proc(self.command(), cwd=ROOT, name=f"vllm {self.name}", env=ENV)
        self.doomed = False

    def healthy(self) -> bool:
        return http_status(self.url, "/health") == 200

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        proc = self.proc
        assert proc is not None, "start() first"

        def up() -> bool:
            if proc.popen.poll() is not None:
                raise AssertionError(f"{proc.name} exited:\n{proc.output[-4000:]}")
            return self.healthy()

        poll_until(up, timeout, f"{self.name} ({self.url}) healthy")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.popen.poll() is None

    def group(self) -> list[int]:
        """Pids of every process in the worker's process group (API server, engine, worker)."""
        assert self.proc is not None
        pgid = self.proc.popen.pid
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid:
                    pids.append(int(entry.name))
        return pids

    def engine_pid(self) -> int:
        """The engine core's pid: vLLM names the process ``VLLM::EngineCore``."""
        for pid in self.group():
            with contextlib.suppress(OSError):
                if "EngineCore" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(
                    errors="replace"
                ):
                    return pid
        raise AssertionError(f"{self.name} has no engine core process: {self.group()}")

    def signal_api(self, sig: int) -> None:
        assert self.proc is not None
        self.doomed = True
        self.proc.signal(sig)

    def kill_engine(self) -> None:
        self.doomed = True
        os.kill(self.engine_pid(), signal.SIGKILL)

    def stop(self) -> None:
        """SIGKILL the whole process group and wait until every member is gone."""
        if self.proc is None:
            return
        pids = self.group()
        self.proc.kill()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        poll_until(lambda: not self.group(), 30, f"{self.name}'s processes gone")

    def restart(self) -> None:
        self.stop()
        self.start()
        self.wait_ready()

    def log(self) -> str:
        return self.proc.output if self.proc else ""


def start_all(workers: Sequence[VLLMWorker]) -> None:
    """Start workers side by side and wait for all; on failure, none is left running."""
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.wait_ready()
    except BaseException:
        for worker in workers:
            worker.stop()
        raise


if __name__ == "__main__":
    # `python -m tests.vllm.fleet`: build the model (make vllm runs this once).
    print(build_model(), file=sys.stderr)
