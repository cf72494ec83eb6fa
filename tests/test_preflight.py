"""Fail fast, in one line: ``--check`` and start-up run the same checks (gateway/preflight.py),
through the real command line.

1. A missing keys file: ``--check`` and start-up both exit 2 naming the setting, its source
   and the file, in one line, before anything listens.
2. A taken port: the same.
3. Settings errors say where the value came from and suggest the key probably meant.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.settings import SettingsError, load_settings
from tests.processes import HOST, START_TIMEOUT, write_config


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    done = subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        env=env,
        check=False,
    )
    return done.returncode, done.stderr.splitlines()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("check", [True, False])
def test_a_missing_keys_file_fails_fast_in_one_line(tmp_path: Path, check: bool) -> None:
    keys = tmp_path / "keys.yaml"
    config = write_config(
        tmp_path / "g.yaml", ["http://127.0.0.1:9"], auth={"keys_file": str(keys)}
    )
    code, lines = run("--config", str(config), *(["--check"] if check else []))
    assert (code, lines) == (
        2,
        [
            f"vllm-gateway: auth.keys_file (file {config}): cannot read {keys}: "
            "No such file or directory"
        ],
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("check", [True, False])
def test_a_taken_port_fails_fast_in_one_line(tmp_path: Path, check: bool) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path / "g.yaml", ["http://127.0.0.1:9"])
        env = {"VLLM_GATEWAY_SERVER__PORT": str(port), "PATH": ""}
        code, lines = run("--config", str(config), *(["--check"] if check else []), env=env)
    assert (code, lines) == (
        2,
        [
            "vllm-gateway: server.port (environment VLLM_GATEWAY_SERVER__PORT): "
            f"cannot listen on {HOST}:{port}: Address already in use"
        ],
    )


@pytest.mark.timeout(60)
def test_check_passes_and_version_answers(tmp_path: Path) -> None:
    config = write_config(tmp_path / "g.yaml", ["http://127.0.0.1:9"])
    code, _ = run("--config", str(config), "--check")
    assert code == 0
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "--version"],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=True,
    )
    assert done.stdout.strip() == "vllm-gateway 0.1.0"


@pytest.mark.parametrize(
    ("yaml_text", "environ", "expected"),
    [
        (
            "workers: [{url: 'http://w:1'}]\nserver: {proceses: 2}\n",
            {},
            "server.proceses (file {config}): unknown key; did you mean server.processes?",
        ),
        (
            "workers: [{url: 'http://w:1', max_inflight: 3}]\n",
            {},
            "workers.0.max_inflight (file {config}): unknown key; "
            "did you mean workers.0.max_in_flight?",
        ),
        (
            "workers: [{url: 'http://w:1'}]\n",
            {"VLLM_GATEWAY_AUTH__KEYS": "[{name: a, sha256: '" + "0" * 64 + "', rmp: 5}]"},
            "auth.keys.0.rmp (environment VLLM_GATEWAY_AUTH__KEYS): unknown key; "
            "did you mean auth.keys.0.rpm?",
        ),
        (
            "workers: [{url: 'http://w:1'}]\n",
            {"VLLM_GATEWAY_SERVER__PORT": "-1"},
            "server.port (environment VLLM_GATEWAY_SERVER__PORT): "
            "Input should be greater than or equal to 0",
        ),
        ("workers: [{url: 'http://w:1'}]\nzzz: 1\n", {}, "zzz (file {config}): unknown key"),
    ],
)
def test_settings_errors_name_the_source_and_suggest(
    tmp_path: Path, yaml_text: str, environ: dict[str, str], expected: str
) -> None:
    config = tmp_path / "g.yaml"
    config.write_text(yaml_text)
    with pytest.raises(SettingsError) as info:
        load_settings(config, environ)
    assert str(info.value).splitlines()[1:] == ["  " + expected.format(config=config)]
