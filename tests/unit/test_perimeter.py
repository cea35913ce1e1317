"""The Host and Origin rules on their own (server/perimeter.py), against Ollama's."""

from __future__ import annotations

import pytest

from server import perimeter
from server.perimeter import HostPolicy, OriginPolicy, split_host


@pytest.mark.parametrize("header,host", [
    ("localhost:11434", "localhost"), ("[::1]:11434", "::1"), ("[::1]", "::1"), ("::1", "::1"),
    ("Kiln.LAN:80", "kiln.lan"), ("localhost.", "localhost"), ("", ""), ("[fe80::1%25eth0]:1", "fe80::1%25eth0"),
])
def test_split_host(header, host):
    assert split_host(header) == host


def test_this_machines_interface_addresses_are_allowed(monkeypatch):
    monkeypatch.setattr(perimeter, "_proc_addresses", lambda: {"203.0.113.7", "2001:db8::7"})
    policy = HostPolicy([])
    assert policy.allows("203.0.113.7:11434") and policy.allows("[2001:db8::7]:11434")
    assert not policy.allows("203.0.113.8:11434") and not policy.allows("[2001:db8::8]")


def test_proc_addresses_reads_this_machine():
    found = perimeter._proc_addresses()
    if not found:
        pytest.skip("no /proc/net here (not Linux)")
    assert "127.0.0.1" in found


def test_origin_rules_are_ollamas():
    policy = OriginPolicy(["https://*.example.com", "chrome-extension://abc"])
    for origin in ("https://a.example.com", "chrome-extension://abc", "http://localhost:1", "file://"):
        assert policy.allows(origin, "localhost:11434"), origin
    for origin in ("https://example.com.evil", "chrome-extension://abcd", "null", "http://localhost:1x"):
        assert not policy.allows(origin, "localhost:11434"), origin
    assert policy.allows("http://kiln.lan:11434", "kiln.lan:11434")  # same-origin
