"""What start-up needs beyond valid settings, checked before anything is started (and all that
``--check`` does after validation): every file the settings name can be read (the keys file
also parsed, each ``tls`` section's files loaded into an SSL context), and the port can be
bound. Failures are ``PreflightError``s whose one-line
message names the setting and where its value came from (``settings_source``).

``listen`` is also how the gateway binds its port, so a port that is taken fails here, at once:
one serving process serves on that socket; with several, the supervisor makes it the holder
of a ``SO_REUSEPORT`` group with a listening socket per process (``supervisor.hold``).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from gateway.auth import read_keys_file
from gateway.settings import Settings
from gateway.settings_source import source_of
from gateway.tls import TlsFileError, build_context, tls_settings

BACKLOG = 1024  # connections the kernel queues before a serving process accepts them


class PreflightError(Exception):
    """Something start-up needs is not there; the message is one line."""


def check_files(settings: Settings, config: Path | None, environ: Mapping[str, str]) -> None:
    """Every path in the settings names a readable file; the keys file holds valid keys."""
    for loc, path in _paths(settings, ()):
        where = f"{'.'.join(map(str, loc))} ({source_of(loc, config, environ)})"
        try:
            if loc == ("auth", "keys_file"):
                read_keys_file(path)
            else:
                path.read_bytes()
        except OSError as exc:
            raise PreflightError(f"{where}: cannot read {path}: {exc.strerror}") from None
        except (ValueError, yaml.YAMLError) as exc:
            reason = " ".join(str(exc).split())
            raise PreflightError(f"{where}: {reason}") from None
    services = settings.discovery.services
    for loc, tls in tls_settings(settings.workers, services):
        try:
            build_context(tls)
        except TlsFileError as exc:
            key = (*loc, exc.key)
            where = f"{'.'.join(map(str, key))} ({source_of(key, config, environ)})"
            path = getattr(tls, exc.key)
            reason = " ".join(exc.reason.split())
            raise PreflightError(f"{where}: {path} does not load: {reason}") from None


def _paths(node: Any, loc: tuple[str | int, ...]) -> Iterator[tuple[tuple[str | int, ...], Path]]:
    if isinstance(node, Path):
        yield loc, node
    elif isinstance(node, BaseModel):
        for name in type(node).model_fields:
            yield from _paths(getattr(node, name), (*loc, name))
    elif isinstance(node, tuple | list):
        for index, item in enumerate(node):
            yield from _paths(item, (*loc, index))
    elif isinstance(node, dict):
        for key, item in node.items():
            yield from _paths(item, (*loc, str(key)))


def listen(settings: Settings, config: Path | None, environ: Mapping[str, str]) -> socket.socket:
    """The listening socket on ``server.host``:``server.port`` (the first address the host
    resolves to). No SO_REUSEPORT: a port another gateway holds is an error, not a share,
    even while that gateway's serving processes restart (its holder keeps the port)."""
    host, port = settings.server.host, settings.server.port
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        where = source_of(("server", "host"), config, environ)
        raise PreflightError(f"server.host ({where}): cannot resolve {host!r}: {exc}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT only
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        where = source_of(("server", "port"), config, environ)
        raise PreflightError(
            f"server.port ({where}): cannot listen on {host}:{port}: {exc.strerror}"
        ) from None
    sock.set_inheritable(False)
    return sock
