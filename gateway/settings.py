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
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

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
    # Serving processes accepting on the one listening socket (gateway/supervisor.py); "auto":
    # the CPUs this process may use (its affinity, capped by a cgroup CPU quota, as in a
    # Kubernetes pod with a CPU limit). Per-key limits (auth) are kept for all of them by the
    # supervisor; limits.* and workers' max_in_flight are split between them (per_process).
    processes: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = "auto"
    # With several processes: one whose event loop has not answered the supervisor's ping for
    # this long is killed and replaced (its open connections are cut).
    heartbeat_timeout: float = Field(10.0, gt=0)
    max_body_bytes: int = Field(10 * 1024 * 1024, gt=0)
    shutdown_grace: float = Field(5.0, ge=0)
    drain_timeout: float = Field(30.0, ge=0)


def _check_plain(url: AnyHttpUrl) -> None:
    # A worker URL becomes a metric label and a log field: no credentials in it, and no path
    # (the gateway appends /v1/...).
    if url.username or url.password:
        raise ValueError("url must not carry a user or password")
    if url.query or url.fragment or url.path not in (None, "", "/"):
        raise ValueError("url must be scheme://host:port only (no path, query or fragment)")


class TlsSettings(_Frozen):
    """How the gateway checks an ``https://`` worker and proves itself to it (mTLS). One
    ``ssl.SSLContext`` is built per distinct value and shared (gateway/tls.py)."""

    ca_file: Path | None = None  # PEM CA bundle to verify the worker with; None: the system's
    cert_file: Path | None = None  # PEM client certificate, for workers that require one
    key_file: Path | None = None  # its private key; None: the key is in cert_file
    # The name the certificate must carry, also sent as SNI; None: the URL's host, or for a
    # discovered pod (reached by IP) the service's host name.
    server_name: str | None = Field(None, min_length=1)
    insecure_skip_verify: bool = False  # no certificate or name check at all: encryption only

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file needs cert_file")
        if self.insecure_skip_verify and self.ca_file is not None:
            raise ValueError("insecure_skip_verify ignores ca_file: set one of them")
        return self


def _check_tls(url: AnyHttpUrl, tls: TlsSettings | None) -> None:
    if tls is not None and url.scheme != "https":
        raise ValueError("tls is set but the url is not https://")


class WorkerSettings(_Frozen):
    url: AnyHttpUrl
    models: tuple[str, ...] = ()
    # Requests in flight to this worker at most; default limits.pool_per_worker.
    max_in_flight: int | None = Field(None, gt=0)
    # Sent to the worker as "Authorization: Bearer <api_key>" (vLLM's --api-key); the client's
    # own Authorization header never reaches a worker.
    api_key: SecretStr | None = None
    tls: TlsSettings | None = None  # https:// only; None: the system's CAs, the URL's host

    @model_validator(mode="after")
    def _plain_base_url(self) -> Self:
        _check_plain(self.url)
        _check_tls(self.url, self.tls)
        return self

    @property
    def base_url(self) -> str:
        return str(self.url).rstrip("/")


class TimeoutSettings(_Frozen):
    """Named phases of one request (README, "Timeouts"). Each has its own error and metric label."""

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
    # Per gateway, but kept per serving process: with server.processes N each process admits
    # up to ceil(max_in_flight / N) and queues on its own, so one can shed while another has
    # room (per-key limits, auth, are kept gateway-wide by the supervisor).
    max_in_flight: int = Field(256, gt=0)
    pool_size: int = Field(512, gt=0)
    pool_per_worker: int = Field(256, gt=0)
    # Below the worker's own idle timeout (vLLM serves with uvicorn: 5 s), so it is the gateway
    # that closes an idle connection (one the worker closed as a request went is retried, h1).
    keepalive: float = Field(4.0, gt=0)
    retry_after: int = Field(1, ge=0)

    @model_validator(mode="after")
    def _pool_is_not_a_hidden_queue(self) -> Self:
        if self.max_in_flight > self.pool_size:
            raise ValueError(
                "limits.max_in_flight must not exceed limits.pool_size, "
                "or the connection pool becomes a hidden queue"
            )
        return self


class ServiceSettings(_Frozen):
    """A DNS name (e.g. a Kubernetes headless Service) whose every address is a worker."""

    url: AnyHttpUrl
    models: tuple[str, ...] = ()
    max_in_flight: int | None = Field(None, gt=0)
    tls: TlsSettings | None = None  # https:// only; verifies each pod against the service's name

    @model_validator(mode="after")
    def _plain(self) -> Self:
        _check_plain(self.url)
        _check_tls(self.url, self.tls)
        return self


class DiscoverySettings(_Frozen):
    services: tuple[ServiceSettings, ...] = ()
    interval: float = Field(10.0, gt=0)  # seconds between DNS resolutions


class KVEventSettings(_Frozen):
    """Routing by what each worker holds in its KV cache, from vLLM's KV-cache events."""

    enabled: bool = False
    # ZeroMQ endpoints of each worker's publisher and replay socket; {host} is the worker's
    # host, {port} its HTTP port, {port+N} that plus N (several workers on one host). "auto":
    # each worker says (vLLM's GET /kv_event_sources: every engine's sockets and topic), and
    # replay_endpoint, topic and data_parallel_size are not used.
    endpoint: str = Field("tcp://{host}:5557", min_length=1)
    replay_endpoint: str | None = "tcp://{host}:5558"  # None: a gap resets the worker instead
    topic: str = ""  # vLLM's kv-events-config topic
    max_blocks_per_worker: int = Field(200_000, gt=0)  # index memory bound, per worker
    weight: float = Field(8.0, ge=0)  # a fully cached prompt is worth this much load_score
    # Served model name -> the model's tokenizer.json (its chat template is read beside it), so
    # text and chat prompts are tokenized in the gateway (needs the `tokenizer` extra).
    tokenizers: dict[str, Path] = {}
    # Engines behind each worker's address (vLLM --data-parallel-size with one API server), each
    # with its own cache and publisher on the endpoints' port + its rank. A request is sent
    # to the worker holding most of its prompt with X-data-parallel-rank naming the engine.
    data_parallel_size: int = Field(1, ge=1, le=256)


class RoutingSettings(_Frozen):
    policy: Literal["least_loaded", "round_robin"] = "least_loaded"
    affinity: Literal["none", "session", "prefix"] = "none"
    session_header: str = Field("X-Session-Id", min_length=1)
    prefix_chars: int = Field(1024, gt=0)  # leading prompt characters that key prefix affinity
    load_factor: float = Field(1.25, ge=1.0)  # bounded load: at most this times the mean
    scrape_interval: float = Field(2.0, ge=0)  # seconds between /metrics scrapes; 0: never
    scrape_timeout: float = Field(1.0, gt=0)
    # An embeddings batch with more inputs than this is split across workers; 0: never split.
    embedding_shard_size: int = Field(64, ge=0)
    kv_events: KVEventSettings = KVEventSettings()


class RetrySettings(_Frozen):
    max_attempts: int = Field(2, ge=1, le=10)  # per model of a fallback chain
    backoff_base: float = Field(0.02, ge=0)  # full jitter: sleep U(0, min(max, base * 2**k))
    backoff_max: float = Field(0.5, ge=0)
    budget_ratio: float = Field(0.2, ge=0)  # retries at most this share of recent requests...
    budget_min: int = Field(10, ge=0)  # ...plus this many per window
    budget_window: float = Field(10.0, gt=0)
    max_retry_after: float = Field(60.0, ge=0)  # a worker's Retry-After is honoured up to this
    # Worker statuses retried before the commit point (elsewhere, or on the same worker when
    # there is nowhere else). A 500 from vLLM is an engine error worth one more try.
    statuses: tuple[int, ...] = (429, 500, 502, 503, 504)
    # The longest Retry-After a request waits out for a same-worker retry (also bounded by the
    # request's deadline); a longer one reaches the client with its Retry-After.
    max_wait: float = Field(5.0, ge=0)

    @field_validator("statuses")
    @classmethod
    def _error_statuses(cls, statuses: tuple[int, ...]) -> tuple[int, ...]:
        bad = [s for s in statuses if not 400 <= s <= 599]
        if bad:
            raise ValueError(f"retry.statuses: not error statuses: {bad}")
        return statuses


class HealthSettings(_Frozen):
    interval: float = Field(5.0, gt=0)
    timeout: float = Field(2.0, gt=0)
    failures_to_eject: int = Field(3, ge=1)
    ejection_time: float = Field(5.0, gt=0)  # the first ejection; doubles with each repeat
    max_ejection_time: float = Field(300.0, gt=0)


class ResumeSettings(_Frozen):
    """Finishing a chat stream on another worker when its worker fails mid-answer."""

    enabled: bool = False  # for every resumable request; else per request by the header
    header: str = Field("X-Gateway-Resume", min_length=1)  # "true" or "false" per request
    max_resumes: int = Field(1, ge=1, le=5)  # continuations tried per stream


KEY_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"


class RateLimits(_Frozen):
    """Per key (or per key and model): None means no limit of that kind."""

    rpm: int | None = Field(None, gt=0)  # requests per minute
    tpm: int | None = Field(None, gt=0)  # tokens per minute (prompt estimate + max_tokens)
    max_concurrent: int | None = Field(None, gt=0)  # requests in flight at once


class ApiKeySettings(RateLimits):
    """One client key. Its ``name`` appears in metrics and logs; the key itself never does.

    Give the key as ``sha256`` (hex digest of the key: config files need not hold secrets) or
    as ``key`` (e.g. from a Secret through the environment; hashed at load and then dropped).
    """

    name: str = Field(pattern=KEY_NAME)
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    key: SecretStr | None = None
    revoked: bool = False
    admin: bool = False  # may load and unload LoRA adapters on the workers
    models: dict[str, RateLimits] = {}  # per-model limits, on top of the key's own

    @model_validator(mode="after")
    def _one_form(self) -> Self:
        if (self.sha256 is None) == (self.key is None):
            raise ValueError("give exactly one of sha256 and key")
        if self.key is not None and len(self.key.get_secret_value()) < 8:
            raise ValueError("key must be at least 8 characters")
        return self


class AuthSettings(_Frozen):
    keys: tuple[ApiKeySettings, ...] = ()
    keys_file: Path | None = None  # YAML list of keys like `keys`, re-read when it changes
    reload_interval: float = Field(5.0, gt=0)  # seconds between checks of keys_file
    defaults: RateLimits = RateLimits()  # limits for keys that set none of their own

    @model_validator(mode="after")
    def _unique_names(self) -> Self:
        names = [k.name for k in self.keys]
        if len(set(names)) != len(names):
            raise ValueError("auth.keys: names must be unique")
        return self


class RedisSettings(_Frozen):
    """Rate limits shared by every replica; without a URL each replica limits on its own."""

    url: str | None = Field(None, pattern=r"^rediss?://")
    timeout: float = Field(0.05, gt=0)  # seconds one Redis call may take
    on_error: Literal["open", "closed"] = "open"  # Redis unreachable: local limits, or 503


class InputLimitSettings(_Frozen):
    max_tokens: int | None = Field(None, gt=0)  # largest max_tokens / max_completion_tokens
    max_n: int | None = Field(None, gt=0)  # no cap by default: vLLM has none
    max_messages: int = Field(1024, gt=0)
    max_json_depth: int = Field(32, gt=0)


class CorsSettings(_Frozen):
    """Cross-origin access for browser apps. The default is vLLM's: every origin, no
    credentials (keys travel in ``Authorization``, which a page must set itself); an empty
    ``allow_origins`` turns CORS off."""

    allow_origins: tuple[str, ...] = ("*",)
    allow_headers: tuple[str, ...] = ("*",)
    max_age: int = Field(600, ge=0)  # seconds a browser may cache a preflight's answer


class LogSettings(_Frozen):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = "json"


class Settings(_Frozen):
    server: ServerSettings = ServerSettings()
    workers: tuple[WorkerSettings, ...] = ()
    discovery: DiscoverySettings = DiscoverySettings()
    routing: RoutingSettings = RoutingSettings()
    fallbacks: dict[str, tuple[str, ...]] = {}  # model -> models to try, in order, when it fails
    # model -> longer-context models to try, in order, when a worker says the prompt does not
    # fit the model's context (and only then)
    context_fallbacks: dict[str, tuple[str, ...]] = {}
    timeouts: TimeoutSettings = TimeoutSettings()
    limits: LimitSettings = LimitSettings()
    retry: RetrySettings = RetrySettings()
    health: HealthSettings = HealthSettings()
    resume: ResumeSettings = ResumeSettings()
    auth: AuthSettings = AuthSettings()
    redis: RedisSettings = RedisSettings()
    input: InputLimitSettings = InputLimitSettings()
    cors: CorsSettings = CorsSettings()
    logging: LogSettings = LogSettings()

    @model_validator(mode="after")
    def _has_workers(self) -> Self:
        if not self.workers and not self.discovery.services:
            raise ValueError("workers: at least one worker (or discovery.services) is required")
        urls = [w.base_url for w in self.workers]
        duplicates = sorted({u for u in urls if urls.count(u) > 1})
        if duplicates:
            raise ValueError(f"workers: listed more than once: {', '.join(duplicates)}")
        return self

    @model_validator(mode="after")
    def _fallbacks_are_chains(self) -> Self:
        named = (("fallbacks", self.fallbacks), ("context_fallbacks", self.context_fallbacks))
        for name, chains in named:
            for model, chain in chains.items():
                if model in chain or len(set(chain)) != len(chain):
                    raise ValueError(f"{name}.{model}: a chain must not repeat a model")
        return self


def per_process(settings: Settings, processes: int) -> Settings:
    """The share of one of ``processes`` serving processes: the gateway-wide connection and
    in-flight limits divided (rounded up), so the limits in the file still bound the whole
    gateway, and so is the retry budget's floor (its ratio applies to each process's own
    requests, so it holds for the whole gateway as it is). Each process admits, probes and
    routes on its own, like a replica."""
    if processes <= 1:
        return settings

    def share(n: int) -> int:
        return -(-n // processes)

    limits = settings.limits
    return settings.model_copy(
        update={
            "limits": limits.model_copy(
                update={
                    "max_in_flight": share(limits.max_in_flight),
                    "pool_size": share(limits.pool_size),
                    "pool_per_worker": share(limits.pool_per_worker),
                }
            ),
            "retry": settings.retry.model_copy(
                update={"budget_min": share(settings.retry.budget_min)}
            ),
            "workers": tuple(
                w.model_copy(update={"max_in_flight": share(w.max_in_flight)})
                if w.max_in_flight is not None
                else w
                for w in settings.workers
            ),
            "discovery": settings.discovery.model_copy(
                update={
                    "services": tuple(
                        s.model_copy(update={"max_in_flight": share(s.max_in_flight)})
                        if s.max_in_flight is not None
                        else s
                        for s in settings.discovery.services
                    )
                }
            ),
        }
    )


class SettingsError(Exception):
    """Configuration that cannot be used, with a message naming every offending key."""


def load_settings(path: Path | None, environ: Mapping[str, str]) -> Settings:
    """Errors name each setting, where its value came from, and for an unknown key the one
    probably meant (``settings_source``)."""
    from gateway.settings_source import describe

    data: dict[str, Any] = _read_yaml(path) if path is not None else {}
    used = {k: v for k, v in environ.items() if k.startswith(ENV_PREFIX)}
    used = {k: v for k, v in used.items() if not _SERVICE_LINK.fullmatch(k)}
    for key, value in used.items():
        _apply_override(data, key, value)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise SettingsError(describe(exc, Settings, path, used)) from None


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
