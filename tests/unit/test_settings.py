"""Settings: OLLAMA_HOST syntax, Ollama's variable names, the TOML file, and sources."""

import pytest

from server.settings import Settings, parse_host, setting_sources


@pytest.mark.parametrize("value, expected", [
    ("", ("127.0.0.1", 11434)),
    ("127.0.0.1", ("127.0.0.1", 11434)),
    ("0.0.0.0:8080", ("0.0.0.0", 8080)),
    (":9000", ("127.0.0.1", 9000)),
    ("http://example.com", ("example.com", 80)),
    ("https://example.com", ("example.com", 443)),
    ("http://10.0.0.1:11434/ollama", ("10.0.0.1", 11434)),
    ("[::1]:5000", ("::1", 5000)),
])
def test_parse_host(value, expected):
    assert parse_host(value) == expected


def test_env_precedence(monkeypatch, tmp_path):
    cfg = tmp_path / "kiln.toml"
    cfg.write_text('keep_alive = "10m"\nmax_queue = 7\nhost = "127.0.0.1:1"\n')
    monkeypatch.setenv("KILN_CONFIG", str(cfg))
    monkeypatch.setenv("OLLAMA_HOST", "0.0.0.0:2")
    monkeypatch.setenv("KILN_MAX_QUEUE", "9")
    monkeypatch.setenv("OLLAMA_ORIGINS", "https://a.example, chrome-extension://*")
    s = Settings()
    assert s.bind == ("0.0.0.0", 2) and not s.is_loopback
    assert s.max_queue == 9 and s.keep_alive == "10m"
    assert s.origins == ["https://a.example", "chrome-extension://*"]
    src = setting_sources(s)
    assert src["host"][1] == "env OLLAMA_HOST"
    assert src["max_queue"][1] == "env KILN_MAX_QUEUE"
    assert src["keep_alive"][1].startswith("file ")
    assert src["num_parallel"][1] == "default"


def test_kiln_wins_over_ollama(monkeypatch):
    monkeypatch.setenv("OLLAMA_NUM_PARALLEL", "2")
    monkeypatch.setenv("KILN_NUM_PARALLEL", "3")
    assert Settings().num_parallel == 3


# Durations as Ollama reads them: OLLAMA_LOAD_TIMEOUT=10m stopped kiln from starting.
@pytest.mark.parametrize("env, value, field, expected", [
    ("OLLAMA_LOAD_TIMEOUT", "10m", "load_timeout", 600.0),
    ("KILN_LOAD_TIMEOUT", "1h30m", "load_timeout", 5400.0),
    ("OLLAMA_LOAD_TIMEOUT", "90", "load_timeout", 90.0),
    ("OLLAMA_LOAD_TIMEOUT", "0", "load_timeout", float("inf")),  # Ollama: zero or negative = no limit
    ("OLLAMA_LOAD_TIMEOUT", "-1s", "load_timeout", float("inf")),
    ("KILN_SHUTDOWN_GRACE", "1m30s", "shutdown_grace", 90.0),
    ("KILN_SHUTDOWN_GRACE", "500ms", "shutdown_grace", 0.5),
    ("OLLAMA_KEEP_ALIVE", "24h", "keep_alive", "24h"),
])
def test_durations_in_go_syntax(monkeypatch, tmp_path, env, value, field, expected):
    monkeypatch.setenv("KILN_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv(env, value)
    assert getattr(Settings(), field) == expected


@pytest.mark.parametrize("env, value", [
    ("OLLAMA_LOAD_TIMEOUT", "10 minutes"), ("OLLAMA_KEEP_ALIVE", "forever"), ("KILN_SHUTDOWN_GRACE", "-5s"),
    ("KILN_SHUTDOWN_GRACE", "5x"),
])
def test_bad_durations_are_refused_at_startup(monkeypatch, tmp_path, env, value):
    from pydantic import ValidationError

    monkeypatch.setenv("KILN_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv(env, value)
    with pytest.raises(ValidationError):
        Settings()


def test_context_length_defaults_to_the_models_own(monkeypatch, tmp_path):
    monkeypatch.setenv("KILN_CONFIG", str(tmp_path / "none.toml"))
    assert Settings().context_length == 0  # 0 = the model's trained context
    monkeypatch.setenv("OLLAMA_CONTEXT_LENGTH", "2048")
    assert Settings().context_length == 2048


@pytest.mark.parametrize("value, seconds", [
    ("5m", 300.0), ("1h30m", 5400.0), ("1.5s", 1.5), ("300ms", 0.3), ("2h45m30s", 9930.0), ("10", 10.0),
    (7, 7.0), ("-1", float("inf")), ("-5m", float("inf")), (-1, float("inf")), ("0", 0.0), ("+2m", 120.0),
])
def test_parse_duration(value, seconds):
    from server.durations import parse_duration

    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "m", "5 m", "1d", True, None, "1.2.3s", "."])
def test_parse_duration_refuses(value):
    from server.durations import parse_duration

    with pytest.raises(ValueError):
        parse_duration(value)


def test_the_toml_file(monkeypatch, tmp_path):
    """pydantic-settings' TOML source on KILN_CONFIG: top-level keys or a [kiln] table,
    below the environment; a file that does not parse stops the start naming it."""
    cfg = tmp_path / "kiln.toml"
    monkeypatch.setenv("KILN_CONFIG", str(cfg))
    cfg.write_text('[kiln]\nmax_queue = 7\nkeep_alive = "10m"\n')
    s = Settings()
    assert (s.max_queue, s.keep_alive) == (7, "10m")
    assert setting_sources(s)["max_queue"] == (7, f"file {cfg}")
    monkeypatch.setenv("OLLAMA_MAX_QUEUE", "9")
    assert setting_sources(Settings())["max_queue"] == (9, "env OLLAMA_MAX_QUEUE")
    cfg.write_text("max_queue = \n")
    with pytest.raises(ValueError, match=f"cannot read {cfg}: Invalid value"):
        Settings()


def test_the_cli_sends_a_key_from_the_settings(monkeypatch, tmp_path):
    """The client verbs take their key from the settings, as the server does (a keys
    file named in the TOML file included); an admin key first, which create/pull need."""
    from server.cli import Client

    keys = tmp_path / "keys"
    keys.write_text("from-file\n")
    cfg = tmp_path / "kiln.toml"
    cfg.write_text(f'api_keys_file = "{keys}"\n')
    monkeypatch.setenv("KILN_CONFIG", str(cfg))
    assert Client(Settings()).http.headers["Authorization"] == "Bearer from-file"
    monkeypatch.setenv("KILN_API_KEY", "inference")
    assert Client(Settings()).http.headers["Authorization"] == "Bearer inference"
    monkeypatch.setenv("KILN_ADMIN_KEYS", "admin,other")
    assert Client(Settings()).http.headers["Authorization"] == "Bearer admin"
