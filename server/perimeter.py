"""Who may reach the API from a browser: the Host check against DNS rebinding and the
Origin check against cross-site requests. Pure functions over header values; the
middleware (server/middleware.py) applies them before any handler runs.

Both follow Ollama (``allowedHostsMiddleware`` in ``server/routes.go``; the CORS layer
of gin-contrib/cors with ``envconfig.AllowedOrigins``). Where kiln differs, the README
("Browsers, Host and Origin") says so.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
import time
from pathlib import Path

# Ollama's local top-level names: a rebinding page cannot get a public certificate
# or a public DNS entry for them.
LOCAL_SUFFIXES = (".localhost", ".local", ".internal")
# Go's netip.Addr.IsPrivate (RFC 1918 and RFC 4193), which Ollama uses; Python's
# is_private is wider (link-local, documentation and reserved ranges too).
_GO_PRIVATE = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))


def split_host(value: str) -> str:
    """The host of a ``Host`` header, lower-case, without port, IPv6 brackets or a
    trailing dot (``localhost.`` is ``localhost``)."""
    h = value.strip().lower()
    if h.startswith("["):
        end = h.find("]")
        return h[1:end] if end > 0 else h
    if h.count(":") == 1:  # host:port; more colons is a bare IPv6 address
        h = h.split(":", 1)[0]
    return h[:-1] if h.endswith(".") and not h.endswith("..") else h


def _proc_addresses() -> set[str]:
    """Every address of this machine's interfaces, from /proc on Linux (the stdlib has
    no getifaddrs); empty elsewhere, where the hostname's addresses stand in."""
    out: set[str] = set()
    try:
        last = ""
        for line in Path("/proc/net/fib_trie").read_text().splitlines():
            s = line.strip()
            if s.startswith("|--"):
                last = s[3:].strip()
            elif s.startswith("/32 host LOCAL") and last:
                out.add(last)
    except OSError:
        pass
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            raw = line.split()[0]
            out.add(str(ipaddress.IPv6Address(int(raw, 16))))
    except (OSError, ValueError, IndexError):
        pass
    return out


class HostPolicy:
    """Which ``Host`` values the server answers. ``extra`` are the names and addresses
    KILN_ALLOWED_HOSTS adds: exact names, or ``*.example.com`` / ``.example.com`` for a
    domain and its subdomains."""

    ADDRESS_TTL = 30.0  # interfaces change (DHCP, VPN); re-read them this often at most

    def __init__(self, extra: list[str]) -> None:
        self.exact: set[str] = set()
        self.suffixes: list[str] = []
        for item in extra:
            h = split_host(item.split("://", 1)[-1].split("/", 1)[0])  # a URL given for a host is taken as one
            if h.startswith("*."):
                self.suffixes.append(h[1:])
            elif h.startswith("."):
                self.suffixes.append(h)
            elif h:
                self.exact.add(h)
        self.hostname = socket.gethostname().lower().rstrip(".")
        self._fqdn = ""
        self._local: set[str] = set()  # from /proc: this machine's interface addresses
        self._resolved: set[str] = set()  # what the hostname resolves to
        self._read_at = float("-inf")
        self._resolving = False
        self._refresh()

    def _refresh(self) -> None:
        """Re-reads the interface addresses (a local file: cheap) at most every
        ADDRESS_TTL, and resolves the machine's full name and addresses in a thread:
        a resolver that times out must stall neither the start nor the event loop."""
        now = time.monotonic()
        if now - self._read_at <= self.ADDRESS_TTL:
            return
        self._read_at = now
        self._local = _proc_addresses()
        if not self._resolving:
            self._resolving = True
            threading.Thread(target=self._resolve, name="kiln-hostnames", daemon=True).start()

    def _resolve(self) -> None:
        try:
            self._resolved = {str(ai[4][0]) for ai in socket.getaddrinfo(self.hostname, None)}
            self._fqdn = socket.getfqdn(self.hostname).lower().rstrip(".")
        except OSError:
            pass
        finally:
            self._resolving = False

    def addresses(self) -> set[str]:
        self._refresh()
        return self._local | self._resolved

    def allows(self, header: str) -> bool:
        host = split_host(header)
        if host in ("", "localhost", self.hostname) or host in self.exact:
            return True  # an empty Host is an HTTP/1.0 client; browsers always send one
        if host.endswith(LOCAL_SUFFIXES) or any(host.endswith(s) or host == s[1:] for s in self.suffixes):
            return True
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            self._refresh()
            return bool(self._fqdn) and host == self._fqdn
        # An address in Host means the browser connected to that address itself, so no
        # name was rebound. Ollama's set: loopback, private, unspecified, our own.
        if ip.is_loopback or ip.is_unspecified or any(ip in net for net in _GO_PRIVATE):
            return True
        return str(ip) in self.addresses()


def origin_regex(extra: list[str]) -> str:
    """Ollama's default origins (envconfig.AllowedOrigins): http and https on localhost,
    127.0.0.1 and 0.0.0.0 with or without a port, and the app://, file://, tauri://,
    vscode-webview:// and vscode-file:// schemes; plus the configured ones, where ``*``
    matches anything (gin-contrib/cors's wildcard). ``null`` (sandboxed frames, file
    pages in Chrome) is not among them."""
    base = [r"https?://(localhost|127\.0\.0\.1|0\.0\.0\.0)(:\d+)?", r"app://.*", r"file://.*",
            r"tauri://.*", r"vscode-webview://.*", r"vscode-file://.*"]
    base += [".*".join(re.escape(p) for p in o.split("*")) for o in extra]
    return "^(" + "|".join(base) + ")$"


class OriginPolicy:
    def __init__(self, extra: list[str]) -> None:
        self.regex = origin_regex(extra)
        self._match = re.compile(self.regex).match

    def allows(self, origin: str, host: str) -> bool:
        # A same-origin request (the page was served from this very Host) is not a
        # cross-origin one; gin-contrib/cors lets it through the same way. The Host
        # check decides whether that Host is ours.
        if origin in (f"http://{host}", f"https://{host}"):
            return True
        return self._match(origin) is not None
