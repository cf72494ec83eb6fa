"""TLS to workers over real sockets, with a CA and certificates made by the test (``cryptography``):
simulated workers serve HTTPS and the gateway reaches them with its ``tls`` settings.

1. A worker verified against a private CA: chat, health probe and /metrics scrape all pass.
2. A pod found by IP (discovery) is verified against the service's name; the same certificate
   reached as a plain IP worker fails with "IP address mismatch", logged.
3. mTLS: a worker that requires a client certificate serves a gateway that has one and refuses
   one that has none (the cause logged).
4. A wrong CA: every connect fails, the cause is logged once for the worker until it answers
   again, and logged again at the next failure.
5. ``--check`` and start-up fail fast, in one line, on a certificate that cannot be read or
   does not load.
6. One SSL context per distinct setting, shared by the workers that use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import logging
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.settings import SettingsError, build_settings
from gateway.simulator import SimConfig
from gateway.simulator import create_app as create_sim_app
from gateway.tls import WorkerTls
from gateway.upstream import Upstream
from gateway.workers import Worker
from tests.conftest import TEST_SETTINGS, Gateway
from tests.helpers import chat, wait_for
from tests.processes import START_TIMEOUT, write_config
from tests.test_discovery import ScriptedDNS

UPSTREAM_LOG = "gateway.upstream"
SERVICE = "vllm.test"  # the name ScriptedDNS answers for


# --- a small PKI ----------------------------------------------------------------------------


@dataclass
class Issued:
    cert: Path
    key: Path


@dataclass
class Authority:
    """A CA that writes its certificate and the ones it issues as PEM files under ``folder``."""

    name: str
    folder: Path

    def __post_init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.name)])
        public = self._key.public_key()
        self._cert = (
            _builder(subject, subject, public)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self._key, hashes.SHA256())
        )  # fmt: skip
        self.cert = self.folder / f"{self.name}.pem"
        self.cert.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self, label: str, dns: tuple[str, ...] = (), ips: tuple[str, ...] = (), client: bool = False
    ) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, label)])
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            _builder(subject, self._cert.subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        issued = Issued(self.folder / f"{label}.crt", self.folder / f"{label}.key")
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        issued.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return issued


def _builder(
    subject: x509.Name, issuer: x509.Name, public: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


@pytest.fixture
def ca(tmp_path: Path) -> Authority:
    return Authority("ca", tmp_path)


@pytest.fixture
def other_ca(tmp_path: Path) -> Authority:
    return Authority("other-ca", tmp_path)


# --- HTTPS workers and gateways ---------------------------------------------------------------


@dataclass
class TlsWorker:
    server: TestServer
    context: ssl.SSLContext
    handshakes: int = 0  # ClientHellos seen
    requests: int = 0  # HTTP requests that got through TLS

    @property
    def port(self) -> int:
        port = self.server.port
        assert port is not None
        return port


def server_context(issued: Issued, client_ca: Authority | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(issued.cert, issued.key)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(client_ca.cert)
    return context


@pytest.fixture
async def tls_worker() -> AsyncIterator[Callable[..., Any]]:
    workers: list[TlsWorker] = []

    async def start(context: ssl.SSLContext, host: str = "127.0.0.1", port: int = 0) -> TlsWorker:
        app = create_sim_app(SimConfig(itl_base=0.0, default_max_tokens=5))
        server = TestServer(app, host=host, port=port)
        worker = TlsWorker(server, context)

        def hello(sock: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
            worker.handshakes += 1
            sock.context = worker.context  # what the test set last (a renewed certificate)

        @web.middleware
        async def count(request: web.Request, handler: Any) -> web.StreamResponse:
            worker.requests += 1
            response: web.StreamResponse = await handler(request)
            return response

        context.sni_callback = hello
        app.middlewares.append(count)
        await server.start_server(ssl=context)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        await worker.server.close()


@pytest.fixture
async def tls_gateway() -> AsyncIterator[Callable[..., Any]]:
    servers: list[TestServer] = []

    async def start(data: dict[str, Any], resolver: ScriptedDNS | None = None) -> Gateway:
        registry = CollectorRegistry()
        settings = build_settings({**TEST_SETTINGS, **data})
        more = {"resolver": resolver} if resolver is not None else {}
        app = create_app(settings, registry=registry, **more)
        server = TestServer(app)
        await server.start_server()
        servers.append(server)
        return Gateway(str(server.make_url("")).rstrip("/"), app, server, registry)

    yield start
    for server in servers:
        await server.close()


def https_worker(port: int, host: str = "127.0.0.1", **tls: Any) -> dict[str, Any]:
    return {"url": f"https://{host}:{port}", "models": ["sim-model"], "tls": tls}


async def post_chat(client: aiohttp.ClientSession, gateway: Gateway) -> tuple[int, Any]:
    async with client.post(f"{gateway.url}/v1/chat/completions", json=chat()) as resp:
        return resp.status, await resp.json()


def connect_warnings(caplog: pytest.LogCaptureFixture, worker: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == UPSTREAM_LOG and r.levelno == logging.WARNING and worker in r.getMessage()
    ]


# --- 1. a verified worker ---------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_a_worker_verified_by_a_private_ca_serves_probes_and_scrapes(
    ca: Authority, tls_worker: Any, tls_gateway: Any, client: aiohttp.ClientSession
) -> None:
    worker = await tls_worker(server_context(ca.issue("w", ips=("127.0.0.1",))))
    gateway = await tls_gateway(
        {
            "workers": [https_worker(worker.port, ca_file=str(ca.cert))],
            "routing": {"scrape_interval": 0.05},
        }
    )
    [record] = gateway.fleet.workers
    assert record.healthy  # the start-up probe went through TLS
    status, body = await post_chat(client, gateway)
    assert status == 200, body
    assert body["choices"][0]["message"]["content"]
    await wait_for(lambda: record.load is not None, 5, "a /metrics scrape over TLS")
    assert worker.requests >= 3  # /health, the chat, /metrics


# --- 2. a pod by IP, verified by the service's name ------------------------------------------


@pytest.mark.timeout(30)
async def test_a_pod_found_by_ip_is_verified_against_the_service_name(
    ca: Authority,
    tls_worker: Any,
    tls_gateway: Any,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The certificate names only the service. Discovered as https://127.0.0.2 it is checked
    against the service's name and serves; listed as that IP it fails, and the log says why."""
    caplog.set_level(logging.INFO, logger=UPSTREAM_LOG)
    worker = await tls_worker(server_context(ca.issue("svc", dns=(SERVICE,))), host="127.0.0.2")
    tls = {"ca_file": str(ca.cert)}
    services = [{"url": f"https://{SERVICE}:{worker.port}", "models": ["sim-model"], "tls": tls}]
    gateway = await tls_gateway(
        {"discovery": {"services": services, "interval": 60.0}}, ScriptedDNS("127.0.0.2")
    )
    [pod] = gateway.fleet.workers
    assert (pod.url, pod.healthy) == (f"https://127.0.0.2:{worker.port}", True)
    status, body = await post_chat(client, gateway)
    assert status == 200, body

    by_ip = await tls_gateway({"workers": [https_worker(worker.port, "127.0.0.2", **tls)]})
    status, body = await post_chat(client, by_ip)
    assert (status, body["error"]["code"]) == (503, "no_healthy_worker")  # its probe failed
    [line] = connect_warnings(caplog, f"https://127.0.0.2:{worker.port}")
    assert "certificate verify failed: IP address mismatch" in line

    named = await tls_gateway(
        {"workers": [https_worker(worker.port, "127.0.0.2", server_name=SERVICE, **tls)]}
    )
    status, body = await post_chat(client, named)
    assert status == 200, body


# --- 3. mTLS ----------------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_mtls_a_worker_that_requires_a_client_certificate(
    ca: Authority,
    tls_worker: Any,
    tls_gateway: Any,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With the client certificate the worker serves; without it the worker refuses the
    session (no request reaches it) and the log names the TLS alert."""
    caplog.set_level(logging.INFO, logger=UPSTREAM_LOG)
    served = ca.issue("w", ips=("127.0.0.1",))
    worker = await tls_worker(server_context(served, client_ca=ca))
    me = ca.issue("gateway", client=True)
    tls = {"ca_file": str(ca.cert), "cert_file": str(me.cert), "key_file": str(me.key)}
    gateway = await tls_gateway({"workers": [https_worker(worker.port, **tls)]})
    status, body = await post_chat(client, gateway)
    assert status == 200, body
    worker_url = f"https://127.0.0.1:{worker.port}"
    assert connect_warnings(caplog, worker_url) == []

    before = worker.requests
    anonymous = await tls_gateway({"workers": [https_worker(worker.port, ca_file=str(ca.cert))]})
    [record] = anonymous.fleet.workers
    assert not record.healthy
    assert worker.requests == before
    # An asyncio server (aiohttp here, uvicorn in vLLM) closes without the TLS alert.
    [line] = connect_warnings(caplog, worker_url)
    assert line == (
        f"cannot connect to worker {worker_url}: TLS: the worker closed a new connection "
        "without answering (does it require a client certificate, or refuse the one sent?)"
    )


@pytest.mark.timeout(30)
async def test_a_worker_that_sends_the_alert_has_it_logged(
    ca: Authority, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """OpenSSL's own server (as in nginx or Envoy) answers a missing client certificate with
    a TLS alert after the handshake: that alert is the logged cause."""
    caplog.set_level(logging.INFO, logger=UPSTREAM_LOG)
    context = server_context(ca.issue("w", ips=("127.0.0.1",)), client_ca=ca)
    refused = threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve_once() -> None:
            conn, _ = listener.accept()
            conn.settimeout(5)
            with context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False) as tls:
                with contextlib.suppress(ssl.SSLError):
                    tls.do_handshake()
                refused.set()
                # Close only after the client did: closing first could reset the connection
                # (its request unread), and the reset may overtake the alert.
                with contextlib.suppress(OSError):
                    while socket.socket.recv(tls, 4096):
                        pass

        thread = threading.Thread(target=serve_once, daemon=True)
        thread.start()
        settings = build_settings(
            {"workers": [https_worker(port, ca_file=str(ca.cert))], **TEST_SETTINGS}
        )
        upstream = Upstream(
            settings.limits,
            settings.timeouts,
            settings.health,
            tls=WorkerTls(settings.workers),
        )
        try:
            result = await upstream.probe(Worker(f"https://127.0.0.1:{port}", ("sim-model",)))
        finally:
            await upstream.close()
        assert not result.healthy
        assert await asyncio.to_thread(refused.wait, 5)
        await asyncio.to_thread(thread.join, 5)
    [line] = connect_warnings(caplog, f"https://127.0.0.1:{port}")
    assert "TLS: [SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required" in (
        line
    )


# --- 4. a wrong CA, logged once per worker until it connects again --------------------------


@pytest.mark.timeout(30)
async def test_a_wrong_ca_fails_with_its_cause_logged_once_until_it_connects_again(
    ca: Authority,
    other_ca: Authority,
    tls_worker: Any,
    tls_gateway: Any,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """1. The worker's certificate is from another CA: every probe fails (4 handshakes), one
    warning names the cause. 2. It gets a certificate from the trusted CA: the next probe
    passes and requests are served. 3. Back to the wrong one: a second warning."""
    caplog.set_level(logging.INFO, logger=UPSTREAM_LOG)
    wrong = server_context(other_ca.issue("wrong", ips=("127.0.0.1",)))
    right = server_context(ca.issue("right", ips=("127.0.0.1",)))
    worker = await tls_worker(wrong)
    gateway = await tls_gateway(
        {
            "workers": [https_worker(worker.port, ca_file=str(ca.cert))],
            "health": {"interval": 0.05, "timeout": 1.0},
            # Every probe on a new connection, so each one meets the certificate of the moment.
            "limits": {"keepalive": 0.01},
        }
    )
    url = f"https://127.0.0.1:{worker.port}"
    [record] = gateway.fleet.workers
    await wait_for(lambda: worker.handshakes >= 4, 5, "four failed handshakes")
    assert not record.healthy
    status, body = await post_chat(client, gateway)
    assert status == 503, body
    [line] = connect_warnings(caplog, url)
    assert f"cannot connect to worker {url}: TLS: certificate verify failed" in line
    assert worker.requests == 0

    worker.context = right
    await wait_for(lambda: record.healthy, 5, "the probe passes with the right certificate")
    status, body = await post_chat(client, gateway)
    assert status == 200, body
    assert any(
        r.getMessage() == f"worker {url} answers again"
        for r in caplog.records
        if r.name == UPSTREAM_LOG
    )

    worker.context = wrong
    await wait_for(lambda: not record.healthy, 5, "the probe fails again")
    assert len(connect_warnings(caplog, url)) == 2


# --- 5. --check and start-up --------------------------------------------------------------------


def run_gateway(*args: str) -> tuple[int, list[str]]:
    done = subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
    )
    return done.returncode, done.stderr.splitlines()


def config_with_tls(tmp_path: Path, **tls: str) -> Path:
    config = write_config(tmp_path / "g.yaml", [])
    data = yaml.safe_load(config.read_text())
    data["workers"] = [{"url": "https://127.0.0.1:9", "models": ["m"], "tls": tls}]
    config.write_text(yaml.safe_dump(data))
    return config


@pytest.mark.timeout(60)
@pytest.mark.parametrize("check", [True, False])
def test_an_unreadable_certificate_fails_fast_in_one_line(
    ca: Authority, tmp_path: Path, check: bool
) -> None:
    """A directory where the certificate should be (root reads any file, so a mode 000 file
    would not do), and a file that is no certificate."""
    issued = ca.issue("gateway", client=True)
    folder = tmp_path / "certs"
    folder.mkdir()
    config = config_with_tls(tmp_path, cert_file=str(folder), key_file=str(issued.key))
    code, lines = run_gateway("--config", str(config), *(["--check"] if check else []))
    assert (code, lines) == (
        2,
        [
            f"vllm-gateway: workers.0.tls.cert_file (file {config}): "
            f"cannot read {folder}: Is a directory"
        ],
    )

    garbage = tmp_path / "garbage.crt"
    garbage.write_text("not a certificate\n")
    config = config_with_tls(tmp_path, cert_file=str(garbage), key_file=str(issued.key))
    code, lines = run_gateway("--config", str(config), *(["--check"] if check else []))
    assert code == 2
    [line] = lines
    assert line == (
        f"vllm-gateway: workers.0.tls.cert_file (file {config}): {garbage} does not load: "
        "no PEM certificate in it"
    ), line

    config = config_with_tls(tmp_path, cert_file=str(issued.cert), key_file=str(garbage))
    code, lines = run_gateway("--config", str(config), *(["--check"] if check else []))
    assert code == 2
    [line] = lines
    assert line.startswith(
        f"vllm-gateway: workers.0.tls.key_file (file {config}): {garbage} does not load: "
    ), line


@pytest.mark.timeout(60)
def test_check_loads_good_tls_files(ca: Authority, tmp_path: Path) -> None:
    me = ca.issue("gateway", client=True)
    config = config_with_tls(
        tmp_path, ca_file=str(ca.cert), cert_file=str(me.cert), key_file=str(me.key)
    )
    code, lines = run_gateway("--config", str(config), "--check")
    assert (code, lines) == (0, [])


# --- 6. one context per distinct setting --------------------------------------------------------


def test_one_context_per_distinct_setting_shared(ca: Authority) -> None:
    settings = build_settings(
        {
            "workers": [
                {"url": "https://a:1", "tls": {"ca_file": str(ca.cert)}},
                {"url": "https://b:1", "tls": {"ca_file": str(ca.cert)}},
                {"url": "https://c:1", "tls": {"ca_file": str(ca.cert), "server_name": "s"}},
                {"url": "https://d:1"},
                {"url": "http://e:1"},
            ],
            "discovery": {"services": [{"url": f"https://{SERVICE}:8000"}]},
        }
    )
    tls = WorkerTls(settings.workers, settings.discovery.services)
    a, b, c, d = (tls.for_worker(Worker(f"https://{h}:1")) for h in "abcd")
    assert a is not None and b is not None and c is not None and d is not None
    assert a.context is b.context is c.context  # the name to verify is not part of the context
    assert (a.server_name, c.server_name, d.server_name) == (None, "s", None)
    pod = tls.for_worker(Worker("https://10.0.0.5:8000", source=f"https://{SERVICE}:8000"))
    assert pod is not None and pod.context is d.context and pod.server_name == SERVICE
    assert tls.for_worker(Worker("http://e:1")) is None
    assert tls.contexts == 2  # the private CA's, and the system's


@pytest.mark.parametrize(
    ("tls", "message"),
    [
        ({"key_file": "/k"}, "key_file needs cert_file"),
        ({"ca_file": "/c", "insecure_skip_verify": True}, "insecure_skip_verify ignores ca_file"),
    ],
)
def test_inconsistent_tls_settings_are_refused(tls: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError) as info:
        build_settings({"workers": [{"url": "https://w:1", "tls": tls}]})
    assert message in str(info.value)


def test_tls_on_a_plain_http_worker_is_refused() -> None:
    with pytest.raises(SettingsError) as info:
        build_settings({"workers": [{"url": "http://w:1", "tls": {"server_name": "w"}}]})
    assert "tls is set but the url is not https://" in str(info.value)


@pytest.mark.timeout(30)
async def test_insecure_skip_verify_reaches_a_worker_of_an_unknown_ca(
    other_ca: Authority, tls_worker: Any, tls_gateway: Any, client: aiohttp.ClientSession
) -> None:
    worker = await tls_worker(server_context(other_ca.issue("w", dns=("elsewhere",))))
    gateway = await tls_gateway({"workers": [https_worker(worker.port, insecure_skip_verify=True)]})
    status, body = await post_chat(client, gateway)
    assert status == 200, body
