"""API keys: who may use the OpenAI routes, and under which name.

Keys are held only as SHA-256 digests; a presented key is hashed and compared against every
stored digest with ``hmac.compare_digest`` (always all of them, so the time taken says nothing
about which key came close). A key's ``name`` is what metrics and logs show, never the key.
Keys come from settings (``auth.keys``, which the environment can set) and from
``auth.keys_file``, re-read when it changes, so a key is revoked by deleting it from the file
or marking it ``revoked: true``, without a restart. With no keys and no file configured the
gateway is open, and says so at start-up.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import TypeAdapter, ValidationError

from gateway.errors import Unauthorized
from gateway.settings import ApiKeySettings, AuthSettings, RateLimits

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"
_KEY_LIST = TypeAdapter(tuple[ApiKeySettings, ...])


@dataclass(frozen=True, slots=True)
class Client:
    """The identity a request runs under: the key's name and its limits."""

    name: str
    limits: RateLimits = field(default_factory=RateLimits)
    models: dict[str, RateLimits] = field(default_factory=dict)
    admin: bool = False  # may use the admin routes (LoRA adapters)


OPEN_CLIENT = Client(ANONYMOUS)


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyRing:
    def __init__(self, settings: AuthSettings) -> None:
        self._defaults = settings.defaults
        self.enabled = bool(settings.keys) or settings.keys_file is not None
        self._static = settings.keys
        self._entries: list[tuple[bytes, Client]] = []
        self.replace(())

    def replace(self, from_file: Sequence[ApiKeySettings]) -> None:
        """The keys in force: the configured ones plus ``from_file``; revoked ones dropped."""
        self._entries = [
            (_stored_digest(k), self._client(k))
            for k in (*self._static, *from_file)
            if not k.revoked
        ]

    def identify(self, authorization: str | None) -> Client:
        """The client a request's ``Authorization`` header names; ``Unauthorized`` otherwise."""
        if not self.enabled:
            return OPEN_CLIENT
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized()
        presented = digest(token)
        found: Client | None = None
        for stored, client in self._entries:
            if hmac.compare_digest(stored, presented):
                found = client
        if found is None:
            raise Unauthorized()
        return found

    def _client(self, key: ApiKeySettings) -> Client:
        own = RateLimits(rpm=key.rpm, tpm=key.tpm, max_concurrent=key.max_concurrent)
        limits = own if own != RateLimits() else self._defaults
        return Client(key.name, limits, dict(key.models), admin=key.admin)


def _stored_digest(key: ApiKeySettings) -> bytes:
    if key.sha256 is not None:
        return bytes.fromhex(key.sha256)
    assert key.key is not None
    return digest(key.key.get_secret_value())


def read_keys_file(path: Path) -> tuple[ApiKeySettings, ...]:
    """Blocking (file I/O and parsing): run it in an executor. Raises ValueError or OSError."""
    loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    try:
        return _KEY_LIST.validate_python(loaded)
    except ValidationError as exc:
        raise ValueError(f"{path}: {exc.error_count()} invalid key entries") from None


async def watch_keys_file(ring: KeyRing, path: Path, interval: float) -> None:
    """Re-read the keys file whenever its modification time changes; a file that cannot be
    read or parsed leaves the keys in force as they were (and says so in the log)."""
    loop = asyncio.get_running_loop()
    seen: float | None = None
    while True:
        try:
            mtime = (await loop.run_in_executor(None, path.stat)).st_mtime
            if mtime != seen:
                keys = await loop.run_in_executor(None, read_keys_file, path)
                ring.replace(keys)
                seen = mtime
                log.info("loaded %d keys from %s", len(keys), path)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            log.error("cannot load keys from %s (%s): the keys in force are kept", path, exc)
        await asyncio.sleep(interval)
