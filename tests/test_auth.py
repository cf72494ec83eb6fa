"""API keys over real sockets: who gets in, under which name, and what never leaks (the key,
the prompt) into logs, metrics or requests to workers."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from gateway.auth import KeyRing
from gateway.settings import AuthSettings, build_settings
from tests.conftest import GatewayFactory, SimFactory
from tests.helpers import chat, header_recorder, wait_for

KEY = "sk-test-alpha-0123456789"
OTHER = "sk-test-bravo-0123456789"
PROMPT = "my secret prompt about zebras"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


AUTH = {"keys": [{"name": "team-a", "sha256": sha(KEY)}, {"name": "team-b", "key": OTHER}]}


async def post(client: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> tuple[int, Any]:
    body = chat(messages=[{"role": "user", "content": PROMPT}])
    async with client.post(f"{url}/v1/chat/completions", json=body, headers=headers) as resp:
        return resp.status, await resp.json()


@pytest.mark.parametrize(
    "headers",
    [
        {},
        bearer("sk-wrong-key-000000"),
        {"Authorization": KEY},  # no scheme
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": "Bearer "},
        {"X-Api-Key": KEY},
    ],
    ids=["missing", "wrong", "no-scheme", "basic", "empty", "other-header"],
)
async def test_a_missing_or_wrong_key_gets_401_in_openai_shape(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    worker = await sim()
    gw = await gateway(worker, auth=AUTH)
    status, body = await post(client, gw.url, headers)
    assert status == 401
    assert body["error"]["code"] == "invalid_api_key"
    assert body["error"]["type"] == "invalid_request_error"
    assert worker.engine.finished == 0  # nothing reached the worker


async def test_keys_given_as_digest_or_plain_both_work_and_name_the_client(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    gw = await gateway(await sim(), auth=AUTH)
    for key in (KEY, OTHER, KEY):
        status, _ = await post(client, gw.url, bearer(key))
        assert status == 200
    assert gw.metric("gateway_client_requests_total", key="team-a", status="200") == 2
    assert gw.metric("gateway_client_requests_total", key="team-b", status="200") == 1


async def test_models_needs_a_key_but_health_ready_metrics_do_not(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    gw = await gateway(await sim(), auth=AUTH)
    async with client.get(f"{gw.url}/v1/models") as resp:
        assert resp.status == 401
    async with client.get(f"{gw.url}/v1/models", headers=bearer(KEY)) as resp:
        assert resp.status == 200
    for path in ("/health", "/ready", "/metrics", "/openapi.json"):
        async with client.get(f"{gw.url}{path}") as resp:
            assert resp.status == 200, path


async def test_the_openai_sdk_sends_its_key_and_reports_a_bad_one(
    sim: SimFactory, gateway: GatewayFactory
) -> None:
    gw = await gateway(await sim(), auth=AUTH)
    async with openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=KEY, max_retries=0) as sdk:
        answer = await sdk.chat.completions.create(
            model="sim-model", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert answer.choices[0].message.content
    async with openai.AsyncOpenAI(
        base_url=f"{gw.url}/v1", api_key="sk-nope-1234", max_retries=0
    ) as sdk:
        with pytest.raises(openai.AuthenticationError) as caught:
            await sdk.chat.completions.create(
                model="sim-model", messages=[{"role": "user", "content": "hi"}]
            )
    assert caught.value.code == "invalid_api_key"


async def test_a_key_revoked_in_the_keys_file_is_refused_without_a_restart(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(
        f"- {{name: team-a, sha256: {sha(KEY)}}}\n- {{name: team-b, key: {OTHER}}}\n"
    )
    gw = await gateway(await sim(), auth={"keys_file": str(keys_file), "reload_interval": 0.05})
    assert (await post(client, gw.url, bearer(KEY)))[0] == 200
    assert (await post(client, gw.url, bearer(OTHER)))[0] == 200
    keys_file.write_text(
        f"- {{name: team-a, sha256: {sha(KEY)}, revoked: true}}\n- {{name: team-b, key: {OTHER}}}\n"
    )

    deadline = asyncio.get_running_loop().time() + 5.0
    while (await post(client, gw.url, bearer(KEY)))[0] != 401:
        assert asyncio.get_running_loop().time() < deadline, "the revoked key still works"
        await asyncio.sleep(0.02)  # the file is re-read every 0.05 s
    assert (await post(client, gw.url, bearer(OTHER)))[0] == 200


async def test_a_broken_keys_file_keeps_the_keys_in_force(
    sim: SimFactory,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(f"- {{name: team-a, sha256: {sha(KEY)}}}\n")
    gw = await gateway(await sim(), auth={"keys_file": str(keys_file), "reload_interval": 0.05})
    keys_file.write_text("- {name: [not a name]}\n")
    await wait_for(
        lambda: any("cannot load keys" in r.getMessage() for r in caplog.records),
        5.0,
        "reload error logged",
    )
    assert (await post(client, gw.url, bearer(KEY)))[0] == 200


async def test_the_clients_key_never_reaches_a_worker_and_a_worker_key_does(
    gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    async with header_recorder() as (url, seen):
        worker = {"url": url, "models": ["sim-model"], "api_key": "vllm-worker-secret"}
        gw = await gateway(worker, auth=AUTH)
        assert (await post(client, gw.url, bearer(KEY)))[0] == 200
        assert [h.get("Authorization") for h in seen] == ["Bearer vllm-worker-secret"]
        assert "vllm-worker-secret" not in repr(gw.fleet.workers[0])


async def test_no_log_line_or_metric_holds_a_key_or_a_prompt(
    sim: SimFactory,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    worker = {"url": (await sim()).url, "api_key": "vllm-worker-secret"}
    gw = await gateway(worker, auth=AUTH, logging={"level": "DEBUG"})
    for headers in (bearer(KEY), bearer(OTHER), bearer("sk-wrong-guess-9999")):
        await post(client, gw.url, headers)
    async with client.get(f"{gw.url}/metrics") as resp:
        exported = await resp.text()
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert any(r.name == "gateway.access" for r in caplog.records)
    for secret in (KEY, OTHER, "sk-wrong-guess-9999", "vllm-worker-secret", PROMPT, sha(KEY)):
        assert secret not in logged
        assert secret not in exported
    assert 'key="team-a"' in exported


async def test_an_open_gateway_says_so_at_start(
    sim: SimFactory,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gw = await gateway(await sim())
    assert any("open to anyone" in r.getMessage() for r in caplog.records)
    assert (await post(client, gw.url, {}))[0] == 200
    assert gw.metric("gateway_client_requests_total", key="anonymous", status="200") == 1


def test_a_key_must_be_given_once_and_names_are_unique() -> None:
    from gateway.settings import SettingsError

    base = {"workers": [{"url": "http://w:1"}]}
    with pytest.raises(SettingsError, match="exactly one of sha256 and key"):
        build_settings({**base, "auth": {"keys": [{"name": "a"}]}})
    with pytest.raises(SettingsError, match="exactly one of sha256 and key"):
        build_settings({**base, "auth": {"keys": [{"name": "a", "key": KEY, "sha256": sha(KEY)}]}})
    with pytest.raises(SettingsError, match="names must be unique"):
        build_settings(
            {**base, "auth": {"keys": [{"name": "a", "key": KEY}, {"name": "a", "key": OTHER}]}}
        )
    with pytest.raises(SettingsError, match=r"auth\.keys\.0\.name"):
        build_settings({**base, "auth": {"keys": [{"name": "has space", "key": KEY}]}})


def test_every_stored_digest_is_compared() -> None:
    """Constant time over the key set: the loop never stops at the first match."""
    ring = KeyRing(
        AuthSettings.model_validate(
            {"keys": [{"name": f"k{i}", "key": f"sk-key-{i:08d}"} for i in range(5)]}
        )
    )
    calls = 0
    import gateway.auth as auth

    real = auth.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        nonlocal calls
        calls += 1
        return real(a, b)

    auth.hmac.compare_digest = counting  # type: ignore[assignment]
    try:
        assert ring.identify("Bearer sk-key-00000000").name == "k0"
        assert calls == 5
    finally:
        auth.hmac.compare_digest = real  # type: ignore[assignment]
