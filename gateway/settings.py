"""Settings: frozen, strict pydantic models and their loader (defaults < YAML file < environment).

Unknown keys are errors that name the key. Environment overrides use the prefix
``VLLM_GATEWAY_`` and ``__`` between nesting levels, with YAML values, e.g.
``VLLM_GATEWAY_SERVER__PORT=9000`` or ``VLLM_GATEWAY_WORKERS='[{url: "http://w1:8000"}]'``.
The environment is passed in, never read from a global, so tests build settings from dicts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Self

import yaml
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, ValidationError, model_validator

ENV_PREFIX = "VLLM_GATEWAY_"
# Kubernetes injects <SERVICE>_SERVICE_HOST, <SERVICE>_PORT, ... for every Service in the
# namespace; a Service named vllm-gateway yields names under our prefix that are not settings.
_SERVICE_LINK = re.compile(
    ENV_PREFIX + r"(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT(_\d+_(TCP|UDP|SCTP)(_\w+)?)?)"
)

DEFAULT_QUEUE_TIMEOUT = 0.5
DEFAULT_CONNECT_TIMEOUT = 3.0
DEFAULT_FIRST_TOKEN_TIMEOUT = 60.0
DEFAULT_IDLE_TIMEOUT = 30.0
DEFAULT_TOTAL_TIMEOUT = 600.0


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(10 * 1024 * 1024, gt=0)
    shutdown_grace: float = Field(5.0, ge=0)
    drain_timeout: float = Field(30.0, ge=0)


class WorkerSettings(_Frozen):
    url: AnyHttpUrl
    models: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _plain_base_url(self) -> Self:
        # The URL becomes a metric label and a log field: no credentials in it, and no path
        # (the gateway appends /v1/...).
        if self.url.username or self.url.password:
            raise ValueError("url must not carry a user or password")
        if self.url.query or self.url.fragment or self.url.path not in (None, "", "/"):
            raise ValueError("url must be scheme://host:port only (no path, query or fragment)")
        return self

    @property
    def base_url(self) -> str:
        return str(self.url).rstrip("/")


class TimeoutSettings(_Frozen):
    """Named phases of one request; see DESIGN.md. Each has its own error and metric label."""

    queue: float = Field(DEFAULT_QUEUE_TIMEOUT, ge=0)
    connect: float = Field(DEFAULT_CONNECT_TIMEOUT, gt=0)
    first_token: float = Field(DEFAULT_FIRST_TOKEN_TIMEOUT, gt=0)
    idle: float = Field(DEFAULT_IDLE_TIMEOUT, gt=0)
    total: float = Field(DEFAULT_TOTAL_TIMEOUT, gt=0)

    @model_validator(mode="after")
    def _phases_fit_in_total(self) -> Self:
        for name in ("queue", "connect", "first_token", "idle"):
            if getattr(self, name) > self.total:
                raise ValueError(f"timeouts.{name} must not exceed timeouts.total")
        return self


class LimitSettings(_Frozen):
    max_in_flight: int = Field(256, gt=0)
    pool_size: int = Field(512, gt=0)
    pool_per_worker: int = Field(256, gt=0)
    keepalive: float = Field(30.0, gt=0)
    retry_after: int = Field(1, ge=0)

    @model_validator(mode="after")
    def _pool_is_not_a_hidden_queue(self) -> Self:
        if self.max_in_flight > self.pool_size:
            raise ValueError(
                "limits.max_in_flight must not exceed limits.pool_size, "
                "or the connection pool becomes a hidden queue"
            )
        return self


class RetrySettings(_Frozen):
    max_attempts: int = Field(2, ge=1, le=10)


class HealthSettings(_Frozen):
    interval: float = Field(5.0, gt=0)
    timeout: float = Field(2.0, gt=0)
    failures_to_eject: int = Field(3, ge=1)


class LogSettings(_Frozen):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = "json"


class Settings(_Frozen):
    server: ServerSettings = ServerSettings()
    workers: tuple[WorkerSettings, ...]
    timeouts: TimeoutSettings = TimeoutSettings()
    limits: LimitSettings = LimitSettings()
    retry: RetrySettings = RetrySettings()
    health: HealthSettings = HealthSettings()
    logging: LogSettings = LogSettings()

    @model_validator(mode="after")
    def _has_workers(self) -> Self:
        if not self.workers:
            raise ValueError("workers: at least one worker is required")
        urls = [w.base_url for w in self.workers]
        duplicates = sorted({u for u in urls if urls.count(u) > 1})
        if duplicates:
            raise ValueError(f"workers: listed more than once: {', '.join(duplicates)}")
        return self


class SettingsError(Exception):
    """Configuration that cannot be used, with a message naming every offending key."""


def load_settings(path: Path | None, environ: Mapping[str, str]) -> Settings:
    data: dict[str, Any] = _read_yaml(path) if path is not None else {}
    for key, value in environ.items():
        if key.startswith(ENV_PREFIX) and not _SERVICE_LINK.fullmatch(key):
            _apply_override(data, key, value)
    return build_settings(data)


def build_settings(data: Mapping[str, Any]) -> Settings:
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SettingsError(f"{path} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path} is not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise SettingsError(f"{path} must hold a mapping at the top level")
    return loaded


def _apply_override(data: dict[str, Any], key: str, raw: str) -> None:
    path = [part.lower() for part in key.removeprefix(ENV_PREFIX).split("__")]
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise SettingsError(f"{key} is not a valid YAML value") from None
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SettingsError(f"{key} overrides inside '{part}', which is not a mapping")
        node = child
    node[path[-1]] = value


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key")
        else:
            lines.append(f"{where}: {err['msg']}")
    return "invalid settings:\n  " + "\n  ".join(lines)
