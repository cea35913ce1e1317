"""A deterministic fake engine node speaking OpenAI (/v1) and Ollama (/api) over HTTP.

Stdlib only (asyncio streams, HTTP/1.1 with keep-alive and chunked bodies, so a node
killed mid-stream looks to its client as a real one does: an incomplete chunked read).
For routing and failure tests of kiln's upstreams; never a stand-in for a real engine
in a feature's test.

    python tests/upstream/fake_upstream.py --port P [--models m1,m2] [--tokens 40]
        [--delay 0.05] [--serial] [--loading FILE] [--prefix /v1] [--host 127.0.0.1]

Replies are ``t0 t1 ... t{n-1}`` one token per event, ``n`` = ``--tokens`` or the
request's max_tokens/num_predict if smaller, one every ``--delay`` seconds.
``--serial``: one generation at a time (others wait), like an engine with one slot.
``--loading FILE``: /health answers 503 while FILE exists (a node still loading).
``GET /stats``: requests by path and model, in flight, cancelled, the last body.
``--host``: the address to listen on (a network namespace's own, for partition tests).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from typing import Any


class Node:
    def __init__(self, args: argparse.Namespace) -> None:
        self.models = args.models.split(",")
        self.tokens, self.delay, self.loading = args.tokens, args.delay, args.loading
        self.prefix = args.prefix.rstrip("/")
        self.serial = asyncio.Lock() if args.serial else None
        self.stats: dict[str, Any] = {"requests": 0, "by_model": {}, "by_path": {}, "inflight": 0,
                                      "cancelled": 0, "completed": 0, "last": None, "systems": []}

    # -- HTTP ------------------------------------------------------------------------
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, path, _ = line.decode().split(" ", 2)
                headers = {}
                while (h := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    k, v = h.decode().split(":", 1)
                    headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                if not await self.route(method, path.split("?")[0], body, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            writer.close()

    @staticmethod
    async def send(writer: asyncio.StreamWriter, status: int, obj: Any) -> bool:
        data = json.dumps(obj).encode()
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        await writer.drain()
        return True

    async def route(self, method: str, path: str, raw: bytes, w: asyncio.StreamWriter) -> bool:
        if method == "GET":
            if path == "/health":
                loading = self.loading and os.path.exists(self.loading)
                return await self.send(w, 503 if loading else 200, {"status": "loading" if loading else "ok"})
            if path == "/":
                return await self.send(w, 200, "Ollama is running")
            if path == self.prefix + "/models":
                return await self.send(w, 200, {"object": "list", "data": [
                    {"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in self.models]})
            if path in ("/api/tags", "/api/ps"):
                return await self.send(w, 200, {"models": [{"name": m, "model": m} for m in self.models]})
            if path == "/stats":
                return await self.send(w, 200, self.stats)
            return await self.send(w, 404, {"error": "not found"})
        body = json.loads(raw or b"{}")
        model = body.get("model")
        self.stats["requests"] += 1
        self.stats["by_path"][path] = self.stats["by_path"].get(path, 0) + 1
        self.stats["by_model"][model] = self.stats["by_model"].get(model, 0) + 1
        self.stats["last"] = body
        system = next((m.get("content") for m in body.get("messages") or [] if m.get("role") == "system"), None)
        if system is not None and len(self.stats["systems"]) < 1000:
            self.stats["systems"].append(system)
        if model not in self.models:
            return await self.send(w, 404, {"error": {"message": f"model '{model}' not found"}}
                                   if path.startswith(self.prefix) else {"error": f"model '{model}' not found"})
        if path in (self.prefix + "/embeddings", "/api/embed"):
            vecs = [[float(len(t)), 1.0, 0.0] for t in body.get("input") or []]
            if path == "/api/embed":
                return await self.send(w, 200, {"model": model, "embeddings": vecs, "prompt_eval_count": len(vecs)})
            return await self.send(w, 200, {"object": "list", "model": model, "usage": {"prompt_tokens": len(vecs)},
                                            "data": [{"index": i, "embedding": v} for i, v in enumerate(vecs)]})
        kinds = {self.prefix + "/chat/completions": "chat", self.prefix + "/completions": "completion",
                 "/api/chat": "ochat", "/api/generate": "ogen"}
        if path not in kinds:
            return await self.send(w, 404, {"error": "not found"})
        return await self.generate(kinds[path], body, w)

    # -- generation ----------------------------------------------------------------------
    async def generate(self, kind: str, body: dict[str, Any], w: asyncio.StreamWriter) -> bool:
        limit = body.get("max_tokens") if kind in ("chat", "completion") else (body.get("options") or {}).get(
            "num_predict")
        n = min(self.tokens, limit) if isinstance(limit, int) and limit >= 0 else self.tokens
        stream = body.get("stream", kind.startswith("o"))
        self.stats["inflight"] += 1
        try:
            if self.serial is not None:
                async with self.serial:
                    return await self._emit(kind, body, n, stream, w)
            return await self._emit(kind, body, n, stream, w)
        except (ConnectionError, asyncio.CancelledError):
            self.stats["cancelled"] += 1
            raise ConnectionError
        finally:
            self.stats["inflight"] -= 1

    async def _emit(self, kind: str, body: dict[str, Any], n: int, stream: bool, w: asyncio.StreamWriter) -> bool:
        model, t0 = body["model"], time.time()
        words = [f"t{i} " for i in range(n)]
        if not stream:
            await asyncio.sleep(self.delay * n)
            text = "".join(words)
            self.stats["completed"] += 1
            if kind == "chat":
                return await self.send(w, 200, {"id": "x", "object": "chat.completion", "model": model, "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}})
            return await self.send(w, 200, {"model": model, "done": True, "response": text})
        ctype = "application/x-ndjson" if kind.startswith("o") else "text/event-stream"
        w.write(f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())

        async def chunk(data: bytes) -> None:
            w.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            await w.drain()

        if body.get("tools"):  # a call to the first tool, streamed as each API streams calls
            name = body["tools"][0]["function"]["name"]
            if kind == "chat":
                parts = [{"index": 0, "id": "call_1", "type": "function", "function": {"name": name, "arguments": '{"ci'}},
                         {"index": 0, "function": {"arguments": 'ty": "Oslo"}'}}]
                evs = [{"choices": [{"index": 0, "delta": {"tool_calls": [p]}, "finish_reason": None}]} for p in parts]
            else:
                evs = [{"model": model, "done": False, "message": {"role": "assistant", "content": "", "tool_calls": [
                    {"function": {"name": name, "arguments": {"city": "Oslo"}}}]}}]
            for ev in evs:
                await chunk((b"data: " + json.dumps(ev).encode() + b"\n\n") if kind == "chat"
                            else json.dumps(ev).encode() + b"\n")
            words = []
        for i, word in enumerate(words):
            await asyncio.sleep(self.delay)
            if kind == "chat":
                ev = {"id": "x", "object": "chat.completion.chunk", "model": model,
                      "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
            elif kind == "completion":
                ev = {"id": "x", "object": "text_completion", "model": model,
                      "choices": [{"index": 0, "text": word, "finish_reason": None}]}
            elif kind == "ochat":
                ev = {"model": model, "message": {"role": "assistant", "content": word}, "done": False}
            else:
                ev = {"model": model, "response": word, "done": False}
            await chunk((b"data: " + json.dumps(ev).encode() + b"\n\n") if kind in ("chat", "completion")
                        else json.dumps(ev).encode() + b"\n")
        if kind in ("chat", "completion"):
            last = {"id": "x", "model": model, "choices": [{"index": 0, "delta": {}, "text": "",
                                                            "finish_reason": "stop"}]}
            if kind == "completion":
                del last["choices"][0]["delta"]
            usage = {"id": "x", "model": model, "choices": [],
                     "usage": {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}}
            data = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in (last, usage)) + b"data: [DONE]\n\n"
        else:
            data = json.dumps({"model": model, "done": True, "done_reason": "stop", "prompt_eval_count": 3,
                               "eval_count": n, "total_duration": int((time.time() - t0) * 1e9),
                               **({"message": {"role": "assistant", "content": ""}} if kind == "ochat"
                                  else {"response": ""})}).encode() + b"\n"
        await chunk(data)
        w.write(b"0\r\n\r\n")
        await w.drain()
        self.stats["completed"] += 1
        return True


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--models", default="m1")
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--delay", type=float, default=0.05)
    ap.add_argument("--serial", action="store_true")
    ap.add_argument("--loading", default="")
    ap.add_argument("--prefix", default="/v1")
    ap.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args()
    node = Node(args)
    server = await asyncio.start_server(node.handle, args.host, args.port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
