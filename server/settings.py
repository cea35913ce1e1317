"""Every setting, declared once. The only module that reads the environment.

Each setting comes from, in order of precedence: a ``KILN_*`` variable, Ollama's
variable of the same meaning (``OLLAMA_HOST``, ``OLLAMA_MODELS``, ...), the TOML file
named by ``KILN_CONFIG`` (default ``~/.config/kiln/config.toml``), or its default.
``kiln config`` prints the effective values and where each came from.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from backends.upstream import UpstreamConfig
from server.durations import FOREVER, go_duration, parse_duration


def _data_home() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")


def _config_path() -> Path:
    env = os.environ.get("KILN_CONFIG")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "kiln" / "config.toml"


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(populate_by_name=True, extra="ignore", case_sensitive=False)

    host: str = Field(
        "127.0.0.1:11434", validation_alias=_env("KILN_HOST", "OLLAMA_HOST"),
        description="Address to listen on, in OLLAMA_HOST syntax: host, host:port, :port or scheme://host:port.")
    models: Path = Field(
        default_factory=lambda: _data_home() / "kiln" / "models",
        validation_alias=_env("KILN_MODELS", "OLLAMA_MODELS"),
        description="The model store directory.")
    keep_alive: str = Field(
        "5m", validation_alias=_env("KILN_KEEP_ALIVE", "OLLAMA_KEEP_ALIVE"),
        description="How long an idle model stays loaded (Go duration or seconds; negative = forever).")
    num_parallel: int = Field(
        0, ge=0, le=64, validation_alias=_env("KILN_NUM_PARALLEL", "OLLAMA_NUM_PARALLEL"),
        description="Sequences each loaded model runs at once, batched together (0 = 4); where their KV "
                    "cache would not fit the memory budget, the context is cut, not this count.")
    max_queue: int = Field(
        512, ge=1, validation_alias=_env("KILN_MAX_QUEUE", "OLLAMA_MAX_QUEUE"),
        description="Requests that may wait per model before new ones get 503.")
    max_loaded_models: int = Field(
        0, ge=0, validation_alias=_env("KILN_MAX_LOADED_MODELS", "OLLAMA_MAX_LOADED_MODELS"),
        description="Models loaded at once (0 = 3).")
    context_length: int = Field(
        0, ge=0, validation_alias=_env("KILN_CONTEXT_LENGTH", "OLLAMA_CONTEXT_LENGTH"),
        description="Context per request (num_ctx) when a request sets none (0 = the model's trained context); "
                    "capped by the trained context and the memory budget.")
    kv_cache_type: Literal["", "f16", "q8_0", "q4_0"] = Field(
        "", validation_alias=_env("KILN_KV_CACHE_TYPE", "OLLAMA_KV_CACHE_TYPE"),
        description="KV cache element type: f16, q8_0 (half the memory of f16) or q4_0 (a quarter); "
                    "llama.cpp then runs with flash attention, which quantized V needs. Empty = the "
                    "engine's default (llama.cpp f16, OpenVINO's CPU u8). Counted by the memory budget.")
    memory_budget: int = Field(
        0, ge=0, validation_alias=_env("KILN_MEMORY_BUDGET"),
        description="Bytes all loaded models may use (0 = 75% of physical memory).")
    origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias=_env("KILN_ORIGINS", "OLLAMA_ORIGINS"),
        description="Extra web origins allowed to call the API (comma-separated, * wildcards), besides "
                    "Ollama's localhost/app/file defaults; a request with any other Origin gets 403.")
    default_model: str = Field(
        "smollm2:135m", validation_alias=_env("KILN_DEFAULT_MODEL"),
        description="The model `kiln run` uses when none is named.")
    threads: int = Field(
        0, ge=0, validation_alias=_env("KILN_THREADS"),
        description="CPU threads per llama.cpp model: a fixed count, or 0 = adaptive: the physical cores this process may use (capped by a cgroup CPU quota), one fewer while other processes keep a core busy, re-measured every second.")
    load_timeout: float = Field(
        300.0, gt=0, validation_alias=_env("KILN_LOAD_TIMEOUT", "OLLAMA_LOAD_TIMEOUT"),
        description="How long a model may take to load (Go duration or seconds; 0 or negative = no limit, as Ollama).")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias=_env("KILN_API_KEYS", "KILN_API_KEY"),
        description="Inference keys (comma-separated); when set, every request but liveness needs "
                    "Authorization: Bearer <key> (or x-api-key: <key>); model management needs an admin key.")
    api_keys_file: Path | None = Field(
        None, validation_alias=_env("KILN_API_KEYS_FILE"),
        description="A file of API keys, one per line (a Docker or systemd secret).")
    insecure_no_auth: bool = Field(
        False, validation_alias=_env("KILN_INSECURE_NO_AUTH"),
        description="Allow listening beyond loopback without an API key (only behind an authenticating proxy).")
    max_body_bytes: int = Field(
        32 << 20, ge=0, validation_alias=_env("KILN_MAX_BODY_BYTES"),
        description="Largest request body accepted (model uploads to /api/blobs excepted); 0 = no limit.")
    log_format: str = Field(
        "text", pattern="^(text|json)$", validation_alias=_env("KILN_LOG_FORMAT"),
        description="Access log format: text or json.")
    log_content: bool = Field(
        False, validation_alias=_env("KILN_LOG_CONTENT"),
        description="Log prompts and outputs (off: they are private).")
    shutdown_grace: float = Field(
        20.0, ge=0, validation_alias=_env("KILN_SHUTDOWN_GRACE"),
        description="How long running streams may take to finish after SIGTERM (Go duration or seconds).")
    policy: dict[str, Any] = Field(
        default_factory=dict, validation_alias=_env("KILN_POLICY"),
        description="The server-wide generation policy (the [policy] table; JSON in KILN_POLICY): "
                    "mode, context_overflow, limits per option, loop_guard.")
    log_level: str = Field(
        "info", validation_alias=_env("KILN_LOG_LEVEL"), description="debug, info, warning or error.")
    worker_log: str = Field(
        "warning", pattern="(?i)^(debug|info|warning|error)$", validation_alias=_env("KILN_WORKER_LOG"),
        description="The lowest level a model's worker process logs at (debug, info, warning or error); "
                    "its lines reach the gateway's log at their own level, which KILN_LOG_LEVEL filters again.")
    upstreams: list[UpstreamConfig] = Field(
        default_factory=list, validation_alias=_env("KILN_UPSTREAMS"),
        description="Other engines serving models through kiln (the [[upstreams]] tables; JSON in "
                    "KILN_UPSTREAMS): name, api (openai|ollama), urls, models, api_key_env, timeouts.")

    @field_validator("upstreams")
    @classmethod
    def _upstream_keys(cls, v: list[UpstreamConfig]) -> list[UpstreamConfig]:
        """Each upstream's key, read from the variable its table names (keys stay out of the file)."""
        names = [u.name for u in v]
        if len(set(names)) != len(names):
            raise ValueError("upstream names must be unique")
        for u in v:
            if u.api_key_env:
                if u.api_key_env not in os.environ:
                    raise ValueError(f"upstream {u.name}: api_key_env {u.api_key_env} is not set")
                u.api_key = SecretStr(os.environ[u.api_key_env])
        return v

    # -- the HTTP edge: who may reach the API (README "Browsers, Host and Origin") --
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias=_env("KILN_ALLOWED_HOSTS"),
        description="Host names (or *.domain) the server answers besides loopback, localhost, *.localhost, "
                    "this machine's names and addresses; * turns the Host check off.")
    admin_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias=_env("KILN_ADMIN_KEYS", "KILN_ADMIN_KEY"),
        description="Admin keys (comma-separated): the only keys that may create, copy, delete, pull, push "
                    "or upload models once any key is set; they work on every other route too.")
    admin_keys_file: Path | None = Field(
        None, validation_alias=_env("KILN_ADMIN_KEYS_FILE"),
        description="A file of admin keys, one per line (a Docker or systemd secret).")
    header_timeout: float = Field(
        10.0, gt=0, validation_alias=_env("KILN_HEADER_TIMEOUT"),
        description="Seconds a connection may take to send a request's line and headers (idle and "
                    "half-sent requests are dropped after this).")

    # Durations are read as Ollama reads them (OLLAMA_LOAD_TIMEOUT=10m must work).
    @field_validator("keep_alive", mode="before")
    @classmethod
    def _keep_alive(cls, v: Any) -> Any:
        parse_duration(v)  # refused at startup, not at the first request
        return str(v)

    @field_validator("load_timeout", mode="before")
    @classmethod
    def _load_timeout(cls, v: Any) -> float:
        seconds = go_duration(v)
        return FOREVER if seconds <= 0 else seconds

    @field_validator("shutdown_grace", mode="before")
    @classmethod
    def _grace(cls, v: Any) -> float:
        return go_duration(v)

    @field_validator("origins", "api_keys", "allowed_hosts", "admin_keys", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _TomlFile(settings_cls)

    # -- derived --------------------------------------------------------------
    @property
    def bind(self) -> tuple[str, int]:
        return parse_host(self.host)

    @property
    def loaded_models_limit(self) -> int:
        return self.max_loaded_models or 3

    @property
    def parallel(self) -> int:
        """``num_parallel``, 0 read as 4."""
        return self.num_parallel or 4

    @property
    def memory_limit(self) -> int:
        if self.memory_budget:
            return self.memory_budget
        try:
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.75)
        except (ValueError, OSError):
            return 8 << 30

    @property
    def keys(self) -> list[str]:
        """The API keys from the environment, the file and the secret file together."""
        return list(self.api_keys) + _read_keys(self.api_keys_file, "KILN_API_KEYS_FILE")

    @property
    def admin_key_list(self) -> list[str]:
        """The admin keys from the environment and the file together."""
        return list(self.admin_keys) + _read_keys(self.admin_keys_file, "KILN_ADMIN_KEYS_FILE")

    @property
    def any_keys(self) -> bool:
        return bool(self.keys or self.admin_key_list)

    @property
    def is_loopback(self) -> bool:
        host = self.bind[0]
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


def _read_keys(path: Path | None, setting: str) -> list[str]:
    if path is None:
        return []
    try:
        return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    except OSError as e:
        raise ValueError(f"cannot read {setting} {path}: {e.strerror}") from e


class _TomlFile(TomlConfigSettingsSource):
    """pydantic-settings' TOML source on the file ``_config_path()`` names; keys are the
    setting names (``host = "..."``), at the top level or in a ``[kiln]`` table. A file that
    cannot be read or parsed stops the start with its path and the parser's reason."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls, toml_file=_config_path())

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        try:
            data = super()._read_file(file_path)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"cannot read {file_path}: {e}") from e
        return dict(data.get("kiln", data))


def parse_host(value: str) -> tuple[str, int]:
    """OLLAMA_HOST syntax (envconfig.Host): ``[scheme://]host[:port][/path]``.
    The default port is 11434 without a scheme, 80 for http://, 443 for https://."""
    s = value.strip()
    port = 11434
    if "://" in s:
        scheme, s = s.split("://", 1)
        port = {"http": 80, "https": 443}.get(scheme.lower(), 11434)
    s = s.split("/", 1)[0]
    host = s
    if s.startswith("["):  # [::1]:port
        end = s.find("]")
        host, rest = s[1:end], s[end + 1 :]
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif s.count(":") == 1:
        host, p = s.split(":")
        if p.isdigit() and 0 <= int(p) <= 65535:
            port = int(p)
    return host or "127.0.0.1", port


def setting_sources(settings: Settings) -> dict[str, tuple[Any, str]]:
    """Each setting's effective value and where it came from (for ``kiln config``)."""
    out: dict[str, tuple[Any, str]] = {}
    in_file = {k.lower() for k in _TomlFile(Settings).toml_data}
    for name, field in Settings.model_fields.items():
        source = "default"
        alias = field.validation_alias
        names = [n for n in getattr(alias, "choices", []) if isinstance(n, str) and n.isupper()]
        for env in names:
            if env in os.environ:
                source = f"env {env}"
                break
        else:
            if {name, *(n.lower() for n in names)} & in_file:
                source = f"file {_config_path()}"
        out[name] = (getattr(settings, name), source)
    return out
