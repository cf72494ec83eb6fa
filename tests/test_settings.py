"""Settings: defaults, the shipped files, strict keys named in errors, consistency rules, frozen
values, environment overrides, and the ``--check`` command line."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from gateway.settings import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_FIRST_TOKEN_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_QUEUE_TIMEOUT,
    DEFAULT_TOTAL_TIMEOUT,
    Settings,
    SettingsError,
    build_settings,
    load_settings,
)
from gateway.supervisor import cpu_count
from tests.processes import free_port

ROOT = Path(__file__).resolve().parent.parent
GATEWAY_YAML = ROOT / "config" / "gateway.yaml"
LOCAL_YAML = ROOT / "config" / "local.yaml"
WORKER = {"url": "http://w1:8000"}
ENV_WORKERS = '[{url: "http://w1:8000", models: [m1]}]'
SHORT_PHASES = {"queue": 1.0, "connect": 1.0, "first_token": 1.0, "idle": 1.0, "total": 10.0}


def rejected(data: Mapping[str, Any]) -> str:
    with pytest.raises(SettingsError) as info:
        build_settings(data)
    return str(info.value)


def rejected_load(path: Path | None, environ: Mapping[str, str]) -> str:
    with pytest.raises(SettingsError) as info:
        load_settings(path, environ)
    return str(info.value)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "settings.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# --- defaults and the shipped files ---------------------------------------------------------


def test_a_worker_is_all_it_takes() -> None:
    settings = build_settings({"workers": [WORKER]})
    assert settings.server.host == "127.0.0.1"
    assert settings.server.port == 8080
    assert settings.server.max_body_bytes == 10 * 1024 * 1024
    assert settings.timeouts.queue == DEFAULT_QUEUE_TIMEOUT == 0.5
    assert settings.timeouts.connect == DEFAULT_CONNECT_TIMEOUT == 3.0
    assert settings.timeouts.first_token == DEFAULT_FIRST_TOKEN_TIMEOUT == 60.0
    assert settings.timeouts.idle == DEFAULT_IDLE_TIMEOUT == 30.0
    assert settings.timeouts.total == DEFAULT_TOTAL_TIMEOUT == 600.0
    assert (settings.limits.max_in_flight, settings.limits.pool_size) == (256, 512)
    assert settings.retry.max_attempts == 2
    assert settings.health.failures_to_eject == 3
    assert (settings.logging.level, settings.logging.format) == ("INFO", "json")
    [worker] = settings.workers
    assert worker.base_url == "http://w1:8000"
    assert worker.models == ()


def test_worker_base_url_has_no_trailing_slash() -> None:
    settings = build_settings({"workers": [{"url": "http://w1:8000/"}]})
    assert settings.workers[0].base_url == "http://w1:8000"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://admin:s3cret@w1:8000", "user or password"),
        ("http://w1:8000/v1", "no path"),
        ("http://w1:8000?x=1", "no path, query"),
    ],
)
def test_worker_url_is_a_plain_base_url(url: str, message: str) -> None:
    """It becomes a metric label and a log field: never credentials; the gateway adds /v1."""
    with pytest.raises(SettingsError, match=message):
        build_settings({"workers": [{"url": url}]})


def test_a_worker_listed_twice_is_rejected() -> None:
    """Retries must never land on the same worker twice."""
    with pytest.raises(SettingsError, match="more than once: http://w1:8000"):
        build_settings({"workers": [{"url": "http://w1:8000"}, {"url": "http://w1:8000/"}]})


def test_shipped_gateway_yaml_loads_and_shows_the_defaults() -> None:
    settings = load_settings(GATEWAY_YAML, environ={})
    assert [w.base_url for w in settings.workers] == [
        "http://127.0.0.1:8001",
        "http://127.0.0.1:8002",
    ]
    assert [w.models for w in settings.workers] == [("sim-model",), ()]
    # The file says "the values shown are the defaults": keep the two from drifting apart.
    defaults = build_settings({"workers": [WORKER]})
    assert settings.model_dump(exclude={"workers"}) == defaults.model_dump(exclude={"workers"})


def test_shipped_gateway_yaml_documents_every_key() -> None:
    shipped = yaml.safe_load(GATEWAY_YAML.read_text(encoding="utf-8"))
    for section, model in Settings.model_fields.items():
        assert section in shipped, f"{section} is not in config/gateway.yaml"
        annotation = model.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            missing = set(annotation.model_fields) - set(shipped[section])
            assert not missing, f"{section}: {sorted(missing)} not in config/gateway.yaml"


def test_shipped_local_yaml_loads() -> None:
    settings = load_settings(LOCAL_YAML, environ={})
    assert [w.base_url for w in settings.workers] == [
        "http://127.0.0.1:8001",
        "http://127.0.0.1:8002",
    ]
    assert all(w.models == () for w in settings.workers)
    assert settings.server.port == 8080
    assert settings.server.shutdown_grace == 0.5
    assert settings.server.drain_timeout == 10.0
    assert settings.health.interval == 1.0
    assert settings.logging.format == "text"


# --- strict keys and consistency ------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"workers": [WORKER], "servr": {"port": 1}}, "servr"),
        ({"workers": [WORKER], "server": {"prot": 1}}, "server.prot"),
        ({"workers": [WORKER], "timeouts": {"read": 1.0}}, "timeouts.read"),
        ({"workers": [{"url": "http://w1:8000", "modelz": ["m"]}]}, "workers.0.modelz"),
        ({"workers": [WORKER, {"url": "http://w2:8000", "weight": 2}]}, "workers.1.weight"),
    ],
)
def test_unknown_key_is_named(data: dict[str, Any], key: str) -> None:
    assert f"{key}: unknown key" in rejected(data)


def test_every_unknown_key_is_named_at_once() -> None:
    message = rejected({"workers": [WORKER], "servr": {}, "limits": {"max_inflight": 1}})
    assert "servr: unknown key" in message
    assert "limits.max_inflight: unknown key" in message


NO_WORKERS = "workers: at least one worker (or discovery.services) is required"


def test_missing_workers_are_rejected() -> None:
    assert NO_WORKERS in rejected({})


def test_empty_worker_list_is_rejected() -> None:
    assert NO_WORKERS in rejected({"workers": []})
    assert NO_WORKERS in rejected({"workers": [], "discovery": {"services": []}})


def test_a_discovery_service_is_enough() -> None:
    services = [{"url": "http://vllm-headless.default.svc:8000", "models": ["m"]}]
    settings = build_settings({"discovery": {"services": services}})
    assert settings.workers == ()
    assert str(settings.discovery.services[0].url) == "http://vllm-headless.default.svc:8000/"


@pytest.mark.parametrize(
    "url", ["http://user:pw@svc:8000", "http://svc:8000/v1", "http://svc:8000/?x=1"]
)
def test_discovery_urls_are_plain(url: str) -> None:
    assert "url must" in rejected({"discovery": {"services": [{"url": url}]}})


@pytest.mark.parametrize("chain", [["a"], ["b", "b"]])
def test_fallback_chains_do_not_repeat(chain: list[str]) -> None:
    message = rejected({"workers": [WORKER], "fallbacks": {"a": chain}})
    assert "fallbacks.a: a chain must not repeat a model" in message


@pytest.mark.parametrize(
    ("section", "values", "key"),
    [
        ("routing", {"policy": "random"}, "routing.policy"),
        ("routing", {"affinity": "user"}, "routing.affinity"),
        ("routing", {"load_factor": 0.9}, "routing.load_factor"),
        ("retry", {"budget_ratio": -1}, "retry.budget_ratio"),
        ("health", {"ejection_time": 0}, "health.ejection_time"),
    ],
)
def test_routing_values_are_checked(section: str, values: dict[str, object], key: str) -> None:
    assert f"{key}:" in rejected({"workers": [WORKER], section: values})


@pytest.mark.parametrize("url", ["not a url", "ftp://w1:8000", "http://", ""])
def test_bad_worker_url_is_rejected(url: str) -> None:
    message = rejected({"workers": [WORKER, {"url": url}]})
    assert "workers.1.url:" in message
    assert "workers.0" not in message


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"server": {"port": 70000}}, "server.port"),
        ({"timeouts": {"connect": 0}}, "timeouts.connect"),
        ({"timeouts": {"queue": -1}}, "timeouts.queue"),
        ({"retry": {"max_attempts": 0}}, "retry.max_attempts"),
        ({"logging": {"level": "TRACE"}}, "logging.level"),
        ({"limits": {"pool_size": "many"}}, "limits.pool_size"),
    ],
)
def test_out_of_range_value_is_named(data: dict[str, Any], key: str) -> None:
    assert f"{key}:" in rejected({"workers": [WORKER], **data})


@pytest.mark.parametrize("phase", ["queue", "connect", "first_token", "idle"])
def test_phase_longer_than_total_is_rejected(phase: str) -> None:
    message = rejected({"workers": [WORKER], "timeouts": {**SHORT_PHASES, phase: 10.5}})
    assert f"timeouts.{phase} must not exceed timeouts.total" in message


@pytest.mark.parametrize("phase", ["queue", "connect", "first_token", "idle"])
def test_phase_equal_to_total_is_accepted(phase: str) -> None:
    settings = build_settings({"workers": [WORKER], "timeouts": {**SHORT_PHASES, phase: 10.0}})
    assert getattr(settings.timeouts, phase) == 10.0


def test_in_flight_limit_above_pool_size_is_rejected() -> None:
    message = rejected({"workers": [WORKER], "limits": {"max_in_flight": 9, "pool_size": 8}})
    assert "limits.max_in_flight must not exceed limits.pool_size" in message


def test_in_flight_limit_equal_to_pool_size_is_accepted() -> None:
    settings = build_settings({"workers": [WORKER], "limits": {"max_in_flight": 8, "pool_size": 8}})
    assert settings.limits.max_in_flight == settings.limits.pool_size == 8


@pytest.mark.parametrize(
    ("section", "field"),
    [(None, "workers"), ("server", "port"), ("timeouts", "total"), ("limits", "pool_size")],
)
def test_settings_are_frozen(section: str | None, field: str) -> None:
    settings = build_settings({"workers": [WORKER]})
    target = settings if section is None else getattr(settings, section)
    before = getattr(target, field)
    with pytest.raises(ValidationError, match="frozen"):
        setattr(target, field, 1)
    assert getattr(target, field) == before


def test_worker_settings_are_frozen() -> None:
    worker = build_settings({"workers": [WORKER]}).workers[0]
    with pytest.raises(ValidationError, match="frozen"):
        worker.models = ("m",)  # type: ignore[misc]
    assert worker.models == ()


# --- environment overrides ------------------------------------------------------------------


def test_env_sets_a_nested_key() -> None:
    settings = load_settings(
        None, environ={"VLLM_GATEWAY_WORKERS": ENV_WORKERS, "VLLM_GATEWAY_SERVER__PORT": "9000"}
    )
    assert settings.server.port == 9000
    assert settings.server.host == "127.0.0.1"  # the rest of the section keeps its defaults


def test_env_workers_are_a_yaml_list() -> None:
    workers = '[{url: "http://w1:8000", models: [m1, m2]}, {url: "http://w2:8000"}]'
    settings = load_settings(None, environ={"VLLM_GATEWAY_WORKERS": workers})
    assert [w.base_url for w in settings.workers] == ["http://w1:8000", "http://w2:8000"]
    assert [w.models for w in settings.workers] == [("m1", "m2"), ()]


def test_env_values_are_read_as_yaml() -> None:
    environ = {
        "VLLM_GATEWAY_WORKERS": ENV_WORKERS,
        "VLLM_GATEWAY_TIMEOUTS__TOTAL": "30",
        "VLLM_GATEWAY_TIMEOUTS__FIRST_TOKEN": "2.5",
        "VLLM_GATEWAY_LOGGING__LEVEL": "DEBUG",
        "VLLM_GATEWAY_SERVER__HOST": "0.0.0.0",
    }
    settings = load_settings(None, environ)
    assert settings.timeouts.total == 30.0
    assert settings.timeouts.first_token == 2.5
    assert settings.logging.level == "DEBUG"
    assert settings.server.host == "0.0.0.0"


def test_env_wins_over_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "server: {host: 10.0.0.1, port: 8081}\nworkers:\n  - url: http://file:8000\n",
    )
    settings = load_settings(
        path, environ={"VLLM_GATEWAY_SERVER__PORT": "9000", "VLLM_GATEWAY_WORKERS": ENV_WORKERS}
    )
    assert settings.server.port == 9000
    assert settings.server.host == "10.0.0.1"  # not overridden: the file's value stays
    assert [w.base_url for w in settings.workers] == ["http://w1:8000"]


def test_other_environment_variables_are_ignored() -> None:
    environ = {"VLLM_GATEWAY_WORKERS": ENV_WORKERS, "PATH": "/bin", "VLLM_PORT": "1", "PORT": "2"}
    assert load_settings(None, environ).server.port == 8080


@pytest.mark.parametrize(
    ("variable", "key"),
    [
        ("VLLM_GATEWAY_SERVER__PROT", "server.prot"),
        ("VLLM_GATEWAY_SERVR__PORT", "servr"),
        ("VLLM_GATEWAY_BALANCER", "balancer"),
    ],
)
def test_env_override_of_unknown_key_is_named(variable: str, key: str) -> None:
    message = rejected_load(None, {"VLLM_GATEWAY_WORKERS": ENV_WORKERS, variable: "1"})
    assert f"{key} (environment {variable}): unknown key" in message


def test_env_override_with_invalid_yaml_names_the_variable() -> None:
    message = rejected_load(
        None, {"VLLM_GATEWAY_WORKERS": ENV_WORKERS, "VLLM_GATEWAY_SERVER__HOST": "[unclosed"}
    )
    assert "VLLM_GATEWAY_SERVER__HOST is not a valid YAML value" in message


def test_env_override_inside_a_list_names_the_variable() -> None:
    message = rejected_load(
        None, {"VLLM_GATEWAY_WORKERS": ENV_WORKERS, "VLLM_GATEWAY_WORKERS__0__URL": "http://x:1"}
    )
    assert "VLLM_GATEWAY_WORKERS__0__URL" in message
    assert "'workers', which is not a mapping" in message


def test_env_value_is_validated_like_the_file() -> None:
    message = rejected_load(
        None, {"VLLM_GATEWAY_WORKERS": ENV_WORKERS, "VLLM_GATEWAY_TIMEOUTS__QUEUE": "601"}
    )
    assert "timeouts.queue must not exceed timeouts.total" in message


# --- files that cannot be used --------------------------------------------------------------


def test_file_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- url: http://w1:8000\n")
    assert rejected_load(path, {}) == f"{path} must hold a mapping at the top level"


def test_file_that_is_not_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "workers: [{url: http://w1:8000\n")
    assert rejected_load(path, {}).startswith(f"{path} is not valid YAML:")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    assert rejected_load(path, {}) == f"cannot read {path}: No such file or directory"


def test_empty_file_only_lacks_workers(tmp_path: Path) -> None:
    path = write(tmp_path, "# nothing yet\n")
    assert NO_WORKERS in rejected_load(path, {})
    env = {"VLLM_GATEWAY_WORKERS": ENV_WORKERS}
    assert isinstance(load_settings(path, env), Settings)


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "settings.yaml"
    path.write_bytes(b"\xff\xfeworkers: []\n")
    assert str(path) in rejected_load(path, {})


# --- the command line -----------------------------------------------------------------------

MODULE = [sys.executable, "-m", "gateway"]
CONSOLE_SCRIPT = Path(sys.executable).with_name("vllm-gateway")
BAD_YAML = "workers:\n  - url: http://w1:8000\n    modelz: [m]\n"
# Each run checks its own free port: two checks of one port side by side would race for it, and
# a fixed port (the shipped file's 8080) may be taken on the machine running the tests.
PORTS = {name: free_port() for name in ("module_good", "module_env", "script_good")}
RUNS: dict[str, tuple[list[str], dict[str, str]]] = {
    "module_good": (
        [*MODULE, "--config", str(GATEWAY_YAML), "--check"],
        {"VLLM_GATEWAY_SERVER__PORT": str(PORTS["module_good"])},
    ),
    "module_env": (
        [*MODULE, "--config", str(LOCAL_YAML), "--check"],
        {"VLLM_GATEWAY_SERVER__PORT": str(PORTS["module_env"])},
    ),
    "module_bad": ([*MODULE, "--config", "{bad}", "--check"], {}),
    "script_good": (
        [str(CONSOLE_SCRIPT), "--config", str(LOCAL_YAML), "--check"],
        {"VLLM_GATEWAY_SERVER__PORT": str(PORTS["script_good"])},
    ),
}


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[int, str, str]]]:
    """Run the command lines side by side (each pays ~0.5 s of imports), keyed by scenario."""
    bad = tmp_path_factory.mktemp("cli") / "bad.yaml"
    bad.write_text(BAD_YAML, encoding="utf-8")
    base = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_GATEWAY_")}
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        for name, (argv, env) in RUNS.items():
            if argv[0] == str(CONSOLE_SCRIPT) and not CONSOLE_SCRIPT.exists():
                continue
            procs[name] = subprocess.Popen(
                [arg.replace("{bad}", str(bad)) for arg in argv],
                cwd=ROOT,
                env={**base, **env},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        results = {}
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=20)
            results[name] = (proc.returncode, out, err)
        yield results
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


AUTO = cpu_count()  # the shipped file leaves server.processes at auto


def outcome(cli: dict[str, tuple[int, str, str]], name: str) -> tuple[int, str, str]:
    if name not in cli:
        pytest.skip(f"console script not installed next to {sys.executable}")
    return cli[name]


def test_check_accepts_the_shipped_file(cli: dict[str, tuple[int, str, str]]) -> None:
    code, out, err = outcome(cli, "module_good")
    assert (code, err) == (0, "")
    port = PORTS["module_good"]
    assert out == f"settings OK: 2 worker(s), port {port} free, {AUTO} serving process(es)\n"


def test_check_rejects_a_bad_file_naming_the_key(cli: dict[str, tuple[int, str, str]]) -> None:
    code, out, err = outcome(cli, "module_bad")
    assert code == 2
    assert out == ""
    assert err.startswith("vllm-gateway: invalid settings:")
    assert "workers.0.modelz (file " in err
    assert "unknown key; did you mean workers.0.models?" in err
    assert "Traceback" not in err


def test_check_reads_the_environment(cli: dict[str, tuple[int, str, str]]) -> None:
    code, out, err = outcome(cli, "module_env")
    assert (code, err) == (0, "")
    port = PORTS["module_env"]
    assert out == f"settings OK: 2 worker(s), port {port} free, {AUTO} serving process(es)\n"


def test_console_script_checks_a_file(cli: dict[str, tuple[int, str, str]]) -> None:
    code, out, err = outcome(cli, "script_good")
    assert (code, err) == (0, "")
    port = PORTS["script_good"]
    assert out == f"settings OK: 2 worker(s), port {port} free, {AUTO} serving process(es)\n"


def test_kubernetes_service_link_variables_are_not_settings() -> None:
    """A Service named vllm-gateway makes Kubernetes inject these into every pod."""
    env = {
        "VLLM_GATEWAY_PORT": "tcp://10.0.0.1:8080",
        "VLLM_GATEWAY_PORT_8080_TCP": "tcp://10.0.0.1:8080",
        "VLLM_GATEWAY_PORT_8080_TCP_ADDR": "10.0.0.1",
        "VLLM_GATEWAY_SERVICE_HOST": "10.0.0.1",
        "VLLM_GATEWAY_SERVICE_PORT": "8080",
        "VLLM_GATEWAY_SERVICE_PORT_HTTP": "8080",
        "VLLM_GATEWAY_WORKERS": '[{url: "http://w:8000"}]',
    }
    settings = load_settings(None, env)
    assert settings.server.port == 8080
    assert settings.workers[0].base_url == "http://w:8000"
    with pytest.raises(SettingsError, match="portt"):
        load_settings(None, {**env, "VLLM_GATEWAY_PORTT": "1"})
