"""The dashboard and the alert rules against a real Prometheus (Debian package, `make
prometheus-tools`): every panel query and every alert expression must return data.

1. Two simulated workers and a gateway on real ports; Prometheus on 127.0.0.1 scrapes all three
   every second and loads grafana/alerts.yaml.
2. Mixed load (streams with usage, plain requests, completions, worker 500s and 503s, a burst
   beyond admission, a few streams slower than the TTFT alert threshold) runs until every panel
   query of grafana/dashboard.json returns a series with a finite value.
3. Faults that should fire each alert are injected and each alert expression, run as an instant
   query, must return data: error ratio, TTFT p99 and rejections from the load above, KV cache
   from a long stalled stream, then one worker stopped (worker unhealthy), then both (no
   healthy worker).

Without `prometheus` or `promtool` on PATH these tests fail: they never skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import Gateway, GatewayFactory, Sim, SimFactory
from tests.helpers import chat

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "grafana" / "dashboard.json"
ALERTS = ROOT / "grafana" / "alerts.yaml"
ALERTS_TEST = ROOT / "grafana" / "alerts_test.yaml"
INSTALL_HINT = "run `make prometheus-tools` (Debian package prometheus)"
# Every Grafana variable as Prometheus sees it when "All" is selected; the whole test runs well
# inside the rate window, so rates cover all of its load.
SUBSTITUTIONS = {"$__rate_interval": "30s", "$model": ".*", "$worker": ".*"}
TTFT_ALERT_SECONDS = 5.0


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} is not installed: {INSTALL_HINT}"
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _hostport(url: str) -> str:
    return url.split("://", 1)[1].rstrip("/")


def panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for var, value in SUBSTITUTIONS.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, f"unsubstituted variable in {panel['title']!r}: {expr}"
            out.append((f"{panel['title']} [{target['refId']}]", expr))
    return out


def alert_rules() -> dict[str, str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"]}


class Prometheus:
    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.url = url
        self._session = session

    async def query(self, expr: str) -> list[dict[str, Any]]:
        async with self._session.get(
            f"{self.url}/api/v1/query", params={"query": expr}, timeout=aiohttp.ClientTimeout(5)
        ) as resp:
            body = await resp.json()
        assert body["status"] == "success", f"{expr}: {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def rules(self) -> list[str]:
        async with self._session.get(f"{self.url}/api/v1/rules") as resp:
            body = await resp.json()
        return [rule["name"] for group in body["data"]["groups"] for rule in group["rules"]]

    async def has_data(self, expr: str) -> bool:
        """True when the query returns a series with a finite value (NaN is a quantile over
        zero rates: no data worth drawing)."""
        return any(math.isfinite(float(r["value"][1])) for r in await self.query(expr))


@contextlib.asynccontextmanager
async def run_prometheus(
    tmp: Path, targets: dict[str, list[str]], session: aiohttp.ClientSession
) -> AsyncIterator[Prometheus]:
    """Prometheus scraping ``targets`` (job -> host:port list) every second, alert rules
    loaded; stopped (then killed) on exit whatever happened."""
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": hosts}]}
            for job, hosts in targets.items()
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    log = (tmp / "prometheus.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        _tool("prometheus"),
        f"--config.file={tmp / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await _wait_ready(url, proc, session, tmp / "prometheus.log")
        yield Prometheus(url, session)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()


async def _wait_ready(
    url: str, proc: asyncio.subprocess.Process, session: aiohttp.ClientSession, log: Path
) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.returncode is None, f"prometheus exited: {log.read_text()[-2000:]}"
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(f"{url}/-/ready", timeout=aiohttp.ClientTimeout(1)) as resp:
                if resp.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise AssertionError(f"prometheus not ready within 20s: {log.read_text()[-2000:]}")


async def poll(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s: {what}")
        await asyncio.sleep(0.25)


class Load:
    """Client traffic of every kind the dashboard shows, from one session."""

    def __init__(self, gw: Gateway, session: aiohttp.ClientSession) -> None:
        self._gw = gw
        self._session = session

    async def send(self, body: dict[str, Any], fault: str = "", path: str = "chat") -> int:
        headers = {"X-Sim-Fault": fault} if fault else {}
        url = f"{self._gw.url}/v1/{'chat/completions' if path == 'chat' else 'completions'}"
        async with self._session.post(url, json=body, headers=headers) as resp:
            await resp.read()
            return resp.status

    async def send_admitted(self, body: dict[str, Any], fault: str) -> int:
        """Send until admission lets the request in (a burst may hold every slot)."""
        for _ in range(100):
            status = await self.send(body, fault)
            if status != 503:
                return status
            await asyncio.sleep(0.05)
        raise AssertionError("never admitted in 100 tries")

    async def mixed_round(self) -> None:
        statuses = await asyncio.gather(
            self.send(chat()),
            self.send(chat(stream=True, stream_options={"include_usage": True})),
            self.send(chat(stream=True)),
            self.send({"model": "sim-model", "prompt": "Once upon", "stream": True}, path="cmpl"),
            self.send(chat(), fault="status=500"),  # not retryable: one upstream error, a 500
            self.send(chat(), fault="status=503"),  # retried on the other worker, then a 503
        )
        assert statuses == [200, 200, 200, 200, 500, 503], statuses

    async def burst(self, size: int) -> list[int]:
        """More slow requests at once than admission lets in: the rest are shed with 503."""
        return list(
            await asyncio.gather(
                *(self.send(chat(), fault="slow_first_token=0.3") for _ in range(size))
            )
        )

    async def until_stopped(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.mixed_round()
            statuses = await self.burst(10)
            assert 503 in statuses and 200 in statuses, statuses


def test_promtool_checks_and_unit_tests_the_alert_rules() -> None:
    promtool = _tool("promtool")
    for args in (["check", "rules", str(ALERTS)], ["test", "rules", str(ALERTS_TEST)]):
        done = subprocess.run(
            [promtool, *args], capture_output=True, text=True, timeout=30, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_is_templated_and_uses_only_current_vllm_names() -> None:
    text = DASHBOARD.read_text()
    dashboard = json.loads(text)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["query"]["query"].startswith("label_values(")
    assert variables["worker"]["query"]["query"].startswith("label_values(")
    assert dashboard["schemaVersion"] >= 39
    assert "gpu_cache" not in text and "gpu_prefix_cache" not in text
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    exprs = " ".join(expr for _, expr in panel_queries()) + " ".join(alert_rules().values())
    names = set(re.findall(r"\b(?:gateway_|vllm:)[a-z_:]+", exprs))
    for name in ("num_requests_waiting", "num_requests_running", "kv_cache_usage_perc"):
        assert f"vllm:{name}" in names


async def test_every_panel_and_alert_returns_data_from_real_prometheus(
    sim: SimFactory,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    # A small KV cache, so one long request can fill it past the alert's 90%.
    workers = [await sim(kv_cache_tokens=256, max_model_len=256) for _ in range(2)]
    gw = await gateway(
        *workers,
        limits={"max_in_flight": 8},
        timeouts={"queue": 0.05, "connect": 1.0, "first_token": 10.0, "idle": 10.0, "total": 20},
        health={"interval": 0.2, "timeout": 0.5, "failures_to_eject": 1000},
    )
    targets = {"gateway": [_hostport(gw.url)], "vllm": [_hostport(w.url) for w in workers]}
    load = Load(gw, client)
    stop = asyncio.Event()
    traffic: asyncio.Task[None] | None = None
    slow: list[asyncio.Task[int]] = []
    try:
        async with run_prometheus(tmp_path, targets, client) as prom:
            # Load starts once Prometheus has a first sample of every target: rate() counts
            # only what happens between samples (new upstream connections come early).
            await poll(lambda: prom.has_data("count(up == 1) == 3"), 20, "a first scrape")
            traffic = asyncio.create_task(load.until_stopped(stop))
            ttft_count = "gateway_time_to_first_token_seconds_count"
            await poll(lambda: prom.has_data(ttft_count), 20, "first streams scraped")
            # Streams slower to first token than the alert threshold (2 of the 8 slots).
            slow_fault = f"slow_first_token={TTFT_ALERT_SECONDS + 0.5}"
            slow += [
                asyncio.create_task(load.send_admitted(chat(stream=True), slow_fault))
                for _ in range(2)
            ]

            async def panel_has_data(expr: str) -> bool:
                assert traffic is not None
                if traffic.done():
                    traffic.result()  # the load failed: raise its error, not a timeout
                return await prom.has_data(expr)

            for title, expr in panel_queries():
                await poll(lambda e=expr: panel_has_data(e), 25, f"panel {title}: {expr}")
            stop.set()
            await asyncio.wait_for(traffic, 10)
            assert await asyncio.wait_for(asyncio.gather(*slow), 10) == [200, 200]
            await check_alerts(prom, workers, load)
    finally:
        stop.set()
        tasks = [*slow, *([traffic] if traffic else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def check_alerts(prom: Prometheus, workers: list[Sim], load: Load) -> None:
    rules = alert_rules()
    assert len(rules) == 6
    loaded = await prom.rules()
    assert sorted(loaded) == sorted(rules), "Prometheus did not load grafana/alerts.yaml"

    async def fires(name: str, timeout: float = 10) -> None:
        await poll(lambda: prom.has_data(rules[name]), timeout, f"alert {name}: {rules[name]}")

    checked = set()
    for name in ("GatewayHighErrorRatio", "GatewayTimeToFirstTokenP99High"):
        await fires(name)
        checked.add(name)
    await fires("GatewaySustainedRejections")
    checked.add("GatewaySustainedRejections")

    # One long stream stalls with its KV cache held: 4 prompt + 232 tokens of 256.
    long = asyncio.create_task(
        load.send(chat(stream=True, max_tokens=240), fault="stall_after=232")
    )
    try:
        await fires("VllmKvCacheNearlyFull")
        checked.add("VllmKvCacheNearlyFull")
    finally:
        long.cancel()
        await asyncio.gather(long, return_exceptions=True)

    assert not await prom.has_data(rules["GatewayWorkerUnhealthy"])
    await workers[0].server.close()
    await fires("GatewayWorkerUnhealthy")
    checked.add("GatewayWorkerUnhealthy")
    assert not await prom.has_data(rules["GatewayNoHealthyWorker"])
    await workers[1].server.close()
    await fires("GatewayNoHealthyWorker")
    checked.add("GatewayNoHealthyWorker")
    assert checked == set(rules)


async def test_promtool_check_metrics_passes_on_live_gateway_metrics(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    gw = await gateway(await sim())
    load = Load(gw, client)
    await load.mixed_round()
    async with client.get(f"{gw.url}/metrics") as resp:
        text = await resp.read()
    assert b"gateway_requests_total" in text
    done = subprocess.run(
        [_tool("promtool"), "check", "metrics"],
        input=text,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, (done.stdout + done.stderr).decode()


@pytest.fixture(autouse=True)
def _tools_present() -> None:
    """Fail (never skip) when the tools are missing, naming how to install them."""
    _tool("prometheus")
    _tool("promtool")


def test_dashboard_passes_grafanas_own_schema(tmp_path: Path) -> None:
    """tsc checks the JSON against npm @grafana/schema's Dashboard type (installed by
    `make grafana-tools`); a wrong type in a copy must fail the same check."""
    script = ["sh", str(ROOT / "grafana" / "check-schema.sh")]
    ok = subprocess.run(script, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = json.loads((ROOT / "grafana" / "dashboard.json").read_text())
    broken["refresh"] = 30  # a string in Grafana's schema
    bad_file = tmp_path / "dashboard.json"
    bad_file.write_text(json.dumps(broken))
    bad = subprocess.run([*script, str(bad_file)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert bad.returncode != 0
