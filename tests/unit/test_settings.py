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
