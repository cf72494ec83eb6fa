"""TLS towards workers: the ``ssl.SSLContext`` and the name each ``https://`` worker is checked
against. One context per distinct ``TlsSettings``, built at start-up (reading the files blocks)
and shared by the traffic, the probes and the scrapes of every worker that uses it.

A configured worker is checked against its URL's host unless ``server_name`` says otherwise; a
discovered pod is reached by IP, so it is checked against its service's host name (what a
certificate for a Kubernetes Service carries), again unless ``server_name`` says otherwise.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.discovery import service_source
from gateway.settings import ServiceSettings, TlsSettings, WorkerSettings
from gateway.workers import Worker

# "(_ssl.c:1006)" at the end of OpenSSL's messages says nothing to an operator.
_SOURCE_LINE = re.compile(r"\s*\(_ssl\.c:\d+\)$")


@dataclass(frozen=True, slots=True)
class ClientTls:
    """How to open TLS to one worker."""

    context: ssl.SSLContext
    server_name: str | None  # verified and sent as SNI; None: the URL's host


class TlsFileError(ValueError):
    """A file of a ``TlsSettings`` does not load; ``key`` names the setting (e.g. cert_file)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def build_context(tls: TlsSettings) -> ssl.SSLContext:
    """A client context for ``tls``; reads its files, so only at start-up (or ``--check``)."""
    try:
        context = ssl.create_default_context(
            cafile=str(tls.ca_file) if tls.ca_file is not None else None
        )
    except (ssl.SSLError, OSError) as exc:
        raise TlsFileError("ca_file", _reason(exc)) from exc
    if tls.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.cert_file is not None:
        try:
            context.load_cert_chain(tls.cert_file, tls.key_file, password=_no_password)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise _cert_chain_error(tls, exc) from exc
    return context


def _cert_chain_error(tls: TlsSettings, exc: BaseException) -> TlsFileError:
    """Which of cert_file and key_file did not load: OpenSSL says only "PEM lib" for both."""
    assert tls.cert_file is not None
    try:
        has_cert = b"-----BEGIN CERTIFICATE-----" in tls.cert_file.read_bytes()
    except OSError as read_error:
        return TlsFileError("cert_file", _reason(read_error))
    if not has_cert:
        return TlsFileError("cert_file", "no PEM certificate in it")
    return TlsFileError("key_file" if tls.key_file is not None else "cert_file", _reason(exc))


def _no_password() -> str:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key's password,
    # which would hang a start-up in a container.
    raise ValueError("the private key is encrypted; give an unencrypted key")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError) and exc.strerror:
        return exc.strerror
    return _SOURCE_LINE.sub("", str(exc))


def describe(exc: BaseException) -> str:
    """The cause of a failed connect in a few words, e.g. ``certificate verify failed: IP
    address mismatch, certificate is not valid for '10.0.0.5'``."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: certificate verify failed: {exc.verify_message}".rstrip(".")
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {_reason(exc)}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return _reason(exc) or type(exc).__name__


class WorkerTls:
    """Which ``ClientTls`` each worker gets: a configured one by its URL, a discovered one by
    its service; an ``https://`` worker known to neither gets the system's CAs."""

    def __init__(
        self, workers: Iterable[WorkerSettings] = (), services: Iterable[ServiceSettings] = ()
    ) -> None:
        self._contexts: dict[TlsSettings, ssl.SSLContext] = {}
        self._by_url = {
            w.base_url: self._client(w.tls, None) for w in workers if w.url.scheme == "https"
        }
        self._by_source = {
            service_source(s): self._client(s.tls, s.url.host)
            for s in services
            if s.url.scheme == "https"
        }

    @property
    def contexts(self) -> int:
        """How many distinct contexts were built."""
        return len(self._contexts)

    def for_worker(self, worker: Worker) -> ClientTls | None:
        """None for a plain ``http://`` worker."""
        if not worker.url.startswith("https:"):
            return None
        found = self._by_source.get(worker.source) if worker.source else None
        found = found or self._by_url.get(worker.url)
        # Built (once) on first use: only a worker made outside the settings lands here.
        return found or self._client(None, None)

    def _client(self, tls: TlsSettings | None, default_name: str | None) -> ClientTls:
        tls = tls or TlsSettings()
        key = tls.model_copy(update={"server_name": None})  # the name is checked per connect
        context = self._contexts.get(key)
        if context is None:
            context = self._contexts[key] = build_context(key)
        return ClientTls(context, tls.server_name or default_name)


def tls_settings(
    workers: Iterable[WorkerSettings], services: Iterable[ServiceSettings]
) -> Iterable[tuple[tuple[str | int, ...], TlsSettings]]:
    """Every ``tls`` section with where it is, e.g. ``("workers", 0, "tls")``."""
    for i, worker in enumerate(workers):
        if worker.tls is not None:
            yield ("workers", i, "tls"), worker.tls
    for i, service in enumerate(services):
        if service.tls is not None:
            yield ("discovery", "services", i, "tls"), service.tls
