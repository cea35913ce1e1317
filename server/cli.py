"""The ``kiln`` command: ``serve`` runs the server; the other verbs are clients of a
running server, as Ollama's are (``OLLAMA_HOST`` / ``KILN_HOST`` says where)."""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from server.settings import Settings, setting_sources


class CLIError(Exception):
    pass


def client_key(settings: Settings) -> str | None:
    """The key the client verbs send: an admin key if the settings have one (``create``,
    ``cp``, ``rm`` and ``pull`` need it; it works on every route), else an inference key."""
    try:
        keys = settings.admin_key_list or settings.keys
    except ValueError as e:  # a keys file it cannot read
        raise CLIError(f"Error: {e}") from None
    return keys[0] if keys else None


class Client:
    def __init__(self, settings: Settings) -> None:
        host, port = settings.bind
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        headers = {}
        key = client_key(settings)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self.base = f"http://{host}:{port}"
        self.http = httpx.Client(base_url=self.base, timeout=httpx.Timeout(30.0, read=None), headers=headers)

    def _check(self, r: httpx.Response) -> httpx.Response:
        if r.status_code >= 400:
            r.read()
            try:
                msg = r.json().get("error", r.text)
            except ValueError:
                msg = r.text
            raise CLIError(f"Error: {msg}")
        return r

    def request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self._check(self.http.request(method, path, **kw))
        except httpx.ConnectError:
            raise CLIError(f"Error: could not connect to kiln at {self.base}; is `kiln serve` running?") from None
        return r.json() if r.content else None

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        try:
            with self.http.stream("POST", path, json=body) as r:
                self._check(r)
                for line in r.iter_lines():
                    if not line:
                        continue
                    msg = json.loads(line)
                    if "error" in msg:
                        raise CLIError(f"Error: {msg['error']}")
                    yield msg
        except httpx.ConnectError:
            raise CLIError(f"Error: could not connect to kiln at {self.base}; is `kiln serve` running?") from None


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _ago(ts: str) -> str:
    try:
        secs = (dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(ts)).total_seconds()
    except ValueError:
        return ts
    for unit, n in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if secs >= n:
            k = int(secs // n)
            return f"{k} {unit}{'s' if k > 1 else ''} ago"
    return "Less than a minute ago"


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("    ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


class SafeFormatter(logging.Formatter):
    """No log line carries a raw control character (CR/LF would forge lines, ESC would
    drive the terminal), whatever module logged it and whatever a client put in the
    values it logs; a traceback, appended after the message, keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        from server.middleware import escape_controls

        return escape_controls(super().formatMessage(record))


# -- verbs --------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from server.app import check_exposure, create_app
    from server.connections import http_protocol

    if args.host:
        settings = settings.model_copy(update={"host": args.host})
    if args.models:
        settings = settings.model_copy(update={"models": Path(args.models)})
    try:
        check_exposure(settings)
    except ValueError as e:
        raise CLIError(f"Error: {e}") from None

    handler = logging.StreamHandler()
    handler.setFormatter(SafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler])
    host, port = settings.bind
    app = create_app(settings)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.lifecycle.begin_drain()  # readiness goes 503; new generations are refused
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=settings.log_level.lower(), access_log=False,
                            timeout_graceful_shutdown=int(settings.shutdown_grace) + 5,
                            http=http_protocol(settings.header_timeout))
    Server(config).run()
    return 0


def cmd_list(args: argparse.Namespace, c: Client) -> int:
    models = c.request("GET", "/api/tags")["models"]
    rows = [["NAME", "ID", "SIZE", "MODIFIED"]]
    rows += [[m["name"], m["digest"][:12], _size(m["size"]), _ago(m["modified_at"])] for m in models]
    _table(rows)
    return 0


def cmd_ps(args: argparse.Namespace, c: Client) -> int:
    models = c.request("GET", "/api/ps")["models"]
    rows = [["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]]
    for m in models:
        device = (m.get("kiln") or {}).get("device", "cpu").upper()
        rows.append([m["name"], m["digest"][:12], _size(m["size"]), f"100% {device}", str(m["context_length"]),
                     m["expires_at"]])
    _table(rows)
    return 0


def cmd_show(args: argparse.Namespace, c: Client) -> int:
    info = c.request("POST", "/api/show", json={"model": args.model, "verbose": args.verbose})
    if args.modelfile:
        print(info["modelfile"])
        return 0
    if args.template:
        print(info["template"])
        return 0
    if args.parameters:
        print(info["parameters"])
        return 0
    d, mi = info["details"], info["model_info"]
    arch = mi.get("general.architecture", d.get("family", ""))
    print("  Model")
    for k, v in (("architecture", arch), ("parameters", d.get("parameter_size")),
                 ("context length", mi.get(f"{arch}.context_length")),
                 ("embedding length", mi.get(f"{arch}.embedding_length")),
                 ("quantization", d.get("quantization_level"))):
        if v:
            print(f"    {k:<20}{v}")
    print("\n  Capabilities")
    for cap in info.get("capabilities", []):
        print(f"    {cap}")
    if info.get("parameters"):
        print("\n  Parameters")
        for line in info["parameters"].splitlines():
            print(f"    {line}")
    if info.get("license"):
        print("\n  License")
        print(f"    {info['license'].splitlines()[0]}")
    return 0


def cmd_rm(args: argparse.Namespace, c: Client) -> int:
    for name in args.models:
        c.request("DELETE", "/api/delete", json={"model": name})
        print(f"deleted '{name}'")
    return 0


def cmd_cp(args: argparse.Namespace, c: Client) -> int:
    c.request("POST", "/api/copy", json={"source": args.source, "destination": args.destination})
    print(f"copied '{args.source}' to '{args.destination}'")
    return 0


def cmd_stop(args: argparse.Namespace, c: Client) -> int:
    c.request("POST", "/api/generate", json={"model": args.model, "keep_alive": 0, "prompt": "", "stream": False})
    return 0


def _progress(statuses: Iterator[dict[str, Any]]) -> None:
    last = ""
    for s in statuses:
        line = s.get("status", "")
        if s.get("total"):
            line += f" {100 * s.get('completed', 0) // s['total']:3d}% of {_size(s['total'])}"
        if line != last:
            end = "\r" if s.get("total") else "\n"
            print(line.ljust(60), end=end, file=sys.stderr, flush=True)
            last = line


def cmd_pull(args: argparse.Namespace, c: Client) -> int:
    _progress(c.stream("/api/pull", {"model": args.model, "stream": True}))
    return 0


def _upload(c: Client, path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = f"sha256:{h.hexdigest()}"
    if c.http.head(f"/api/blobs/{digest}").status_code != 200:
        print(f"uploading {path.name}", file=sys.stderr)

        def chunks() -> Iterator[bytes]:
            with path.open("rb") as f:
                yield from iter(lambda: f.read(1 << 20), b"")

        c._check(c.http.post(f"/api/blobs/{digest}", content=chunks(),
                             headers={"Content-Type": "application/octet-stream"}))
    return digest


def cmd_create(args: argparse.Namespace, c: Client) -> int:
    from server.modelfile import ModelfileError, parse

    src = Path(args.file)
    if not src.is_file():
        raise CLIError(f"Error: {src} not found")
    if src.suffix == ".gguf":
        text, base = f"FROM {src}", src.parent
    else:
        text, base = src.read_text(), src.parent
    try:
        mf = parse(text)
    except ModelfileError as e:
        raise CLIError(f"Error: {src}: {e}") from None
    body: dict[str, Any] = {"model": args.model, "stream": True}
    local = (base / Path(mf.from_).expanduser()) if not Path(mf.from_).expanduser().is_absolute() else Path(mf.from_)
    if local.is_file():
        body["files"] = {local.name: _upload(c, local)}
    else:
        body["from"] = mf.from_
    if mf.parameters:
        body["parameters"] = mf.parameters
    if mf.template is not None:
        body["template"] = mf.template
    if mf.system is not None:
        body["system"] = mf.system
    if mf.license:
        body["license"] = mf.license
    if mf.messages:
        body["messages"] = mf.messages
    if mf.adapters:
        body["adapters"] = {Path(a).name: a for a in mf.adapters}
    _progress(c.stream("/api/create", body))
    return 0


def cmd_run(args: argparse.Namespace, c: Client) -> int:
    options: dict[str, Any] = {}
    for kv in args.option or []:
        k, _, v = kv.partition("=")
        options[k] = json.loads(v) if v[:1] in "-0123456789[{\"tf" else v
    prompt = " ".join(args.prompt) if args.prompt else None
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    body = {"model": args.model, "options": options}
    if args.keepalive:
        body["keep_alive"] = args.keepalive
    if prompt is not None:  # one shot
        for msg in c.stream("/api/chat", {**body, "messages": [{"role": "user", "content": prompt}]}):
            print(msg.get("message", {}).get("content", ""), end="", flush=True)
        print()
        return 0
    c.request("POST", "/api/chat", json={"model": args.model, "messages": [], "stream": False})
    history: list[dict[str, str]] = []
    print(">>> Send a message (/bye to quit, /clear to forget the conversation)", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line.strip() in ("/bye", "/exit"):
            return 0
        if line.strip() == "/clear":
            history.clear()
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply = []
        try:
            for msg in c.stream("/api/chat", {**body, "messages": history}):
                piece = msg.get("message", {}).get("content", "")
                reply.append(piece)
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            pass
        print("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


SECRET_SETTINGS = {"api_keys", "admin_keys"}


def mask_key(key: str) -> str:
    """Enough of a key to tell which one it is (its last 4 characters, if it is long
    enough for that to give little away), never the key."""
    return f"****{key[-4:]}" if len(key) >= 16 else "****"


def cmd_config(args: argparse.Namespace, settings: Settings) -> int:
    for name, (value, source) in setting_sources(settings).items():
        if name in SECRET_SETTINGS:
            value = [mask_key(k) for k in value]
        shown = ",".join(map(str, value)) if isinstance(value, list) else value
        if name == "upstreams":  # name=api:replicas (keys are SecretStr: never printed)
            shown = ", ".join(f"{u.name}={u.api}:{' '.join(u.urls)}" for u in value) or "[]"
        print(f"{name:<20} {str(shown):<40} ({source})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln", description="A local LLM server that speaks Ollama's and OpenAI's APIs.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("serve", help="start the server")
    s.add_argument("--host", help="listen address (OLLAMA_HOST syntax); default 127.0.0.1:11434")
    s.add_argument("--models", help="model store directory")
    sub.add_parser("list", aliases=["ls"], help="list models")
    sub.add_parser("ps", help="list loaded models")
    s = sub.add_parser("show", help="show a model's information")
    s.add_argument("model")
    s.add_argument("--modelfile", action="store_true")
    s.add_argument("--template", action="store_true")
    s.add_argument("--parameters", action="store_true")
    s.add_argument("-v", "--verbose", action="store_true")
    s = sub.add_parser("run", help="chat with a model (one shot with a prompt, interactive without)")
    s.add_argument("model")
    s.add_argument("prompt", nargs="*")
    s.add_argument("-o", "--option", action="append", help="an option, e.g. -o temperature=0.1")
    s.add_argument("--keepalive")
    s = sub.add_parser("create", help="create a model from a Modelfile or a GGUF file")
    s.add_argument("model")
    s.add_argument("-f", "--file", default="Modelfile", help="a Modelfile, or a .gguf file")
    s = sub.add_parser("cp", help="copy a model")
    s.add_argument("source")
    s.add_argument("destination")
    s = sub.add_parser("rm", help="remove models")
    s.add_argument("models", nargs="+")
    s = sub.add_parser("pull", help="pull a model from a registry (or restore a bundled one)")
    s.add_argument("model")
    s = sub.add_parser("stop", help="unload a running model")
    s.add_argument("model")
    sub.add_parser("config", help="print the effective settings and where each came from")
    sub.add_parser("compile", help="compile a model for OpenVINO (NPU, GPU, CPU); see kiln compile --help",
                   add_help=False)
    return p


def _configured_store() -> Path:
    try:
        return Settings().models
    except Exception as e:  # noqa: BLE001 - a bad setting is the user's to fix
        print(f"Error: invalid configuration: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compile"]:
        from compile.__main__ import main as compile_main

        return compile_main(argv[1:], default_store=_configured_store)
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
    except Exception as e:  # noqa: BLE001 - a bad setting is the user's to fix
        print(f"Error: invalid configuration: {e}", file=sys.stderr)
        return 2
    try:
        if args.command == "serve":
            return cmd_serve(args, settings)
        if args.command == "config":
            return cmd_config(args, settings)
        handler = {"list": cmd_list, "ls": cmd_list, "ps": cmd_ps, "show": cmd_show, "run": cmd_run,
                   "create": cmd_create, "cp": cmd_cp, "rm": cmd_rm, "pull": cmd_pull, "stop": cmd_stop}
        return handler[args.command](args, Client(settings))
    except CLIError as e:
        print(e, file=sys.stderr)
        return 1
    except BrokenPipeError:  # `kiln run ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit's flush
        return 141  # 128 + SIGPIPE, what a shell reports for a command cut off this way




if __name__ == "__main__":
    sys.exit(main())
