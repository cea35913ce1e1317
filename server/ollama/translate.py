"""Ollama wire <-> the internal ``Inference``: pure functions, no I/O."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from backends.base import Chunk, FinishReason
from backends.store import Manifest
from server import logprobs as lp
from server import options as opts
from server.errors import BadRequest
from server.inference import Inference, Result, capabilities
from server.models import NewModel
from server.ollama.protocol import ChatRequest, CreateRequest, GenerateRequest, Message
from server.scheduler import parse_duration


def now() -> str:
    """RFC 3339 with zone, as Go's time.Time marshals (Open WebUI fromisoformat()s it)."""
    return dt.datetime.now(dt.timezone.utc).astimezone().isoformat()


def keep_alive(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as e:
        raise BadRequest(f"keep_alive: {e}") from None


def check_format(value: Any) -> Any:
    """``"json"``, a JSON schema object, or unset (``""``/null)."""
    if value in (None, ""):
        return None
    if value == "json" or isinstance(value, dict):
        return value
    raise BadRequest(f'invalid format: {value!r}; use "json" or a JSON schema object')


def check_think(value: Any) -> Any:
    if value is None or isinstance(value, bool) or value in ("low", "medium", "high", "max"):
        return value
    raise BadRequest(f'invalid think value {value!r}: use true, false, "low", "medium", "high" or "max"')


def check_top_logprobs(logprobs: bool | None, value: int | None) -> int | None:
    """``Inference.logprobs``; routes.go refuses a bad count before anything else."""
    return lp.wanted(logprobs, value)


def message_dict(m: Message) -> dict[str, Any]:
    d: dict[str, Any] = {"role": m.role.lower(), "content": m.content or ""}
    if m.tool_calls:
        d["tool_calls"] = [{"id": tc.id, "type": "function",
                            "function": {"name": tc.function.name, "arguments": tc.function.arguments}}
                           for tc in m.tool_calls]
    if m.tool_name:
        d["tool_name"] = d["name"] = m.tool_name
    if m.tool_call_id:
        d["tool_call_id"] = m.tool_call_id
    if m.thinking:
        d["thinking"] = m.thinking
    return d


def chat_to_internal(req: ChatRequest) -> Inference:
    logprobs = check_top_logprobs(req.logprobs, req.top_logprobs)
    msgs = req.messages or []
    for m in msgs:
        if m.role.lower() not in ("system", "user", "assistant", "tool"):
            raise BadRequest(f"invalid message role {m.role!r}: use system, user, assistant or tool")
    images = [img for m in msgs for img in (m.images or [])]
    return Inference(
        model=req.model, messages=[message_dict(m) for m in msgs], options=opts.check(req.options),
        format=check_format(req.format), tools=req.tools or None, tool_choice=req.tool_choice,
        think=check_think(req.think), logprobs=logprobs,
        keep_alive=keep_alive(req.keep_alive), images=images or None, truncate=req.truncate, shift=req.shift,
    )


def generate_to_internal(req: GenerateRequest) -> Inference:
    logprobs = check_top_logprobs(req.logprobs, req.top_logprobs)
    if req.raw and (req.template or req.system or req.context):
        raise BadRequest("raw mode does not support template, system, or context")
    return Inference(
        model=req.model, prompt=req.prompt or "", system=req.system, template=req.template,
        raw=bool(req.raw), suffix=req.suffix, options=opts.check(req.options),
        format=check_format(req.format), think=check_think(req.think),
        keep_alive=keep_alive(req.keep_alive), images=req.images or None, truncate=req.truncate, shift=req.shift,
        context=req.context or None, return_context=not req.raw, logprobs=logprobs,
    )


def done_reason(finish: FinishReason) -> str:
    """Only Ollama's values ("stop", "length"; "load"/"unload" elsewhere). The loop guard's
    stop is "length": the answer was cut, not finished, which is what a client must know
    (OpenClaw and others treat an unknown value as an error); X-Kiln-Finish-Reason, the log
    and the metrics keep "loop"."""
    return "length" if finish in (FinishReason.LENGTH, FinishReason.LOOP) else "stop"


def metrics(r: Result) -> dict[str, Any]:
    return {
        "done_reason": done_reason(r.finish),
        "total_duration": int(r.total_ns),
        "load_duration": int(r.load_ns),
        "prompt_eval_count": r.usage.prompt_tokens,
        "prompt_eval_duration": int(r.usage.prompt_ns),
        "eval_count": r.usage.completion_tokens,
        "eval_duration": int(r.usage.eval_ns),
    }


def chat_chunk(model: str, chunk: Chunk) -> dict[str, Any]:
    message = {"role": "assistant", "content": chunk.text}
    if chunk.thinking:
        message["thinking"] = chunk.thinking
    return _with_logprobs({"model": model, "created_at": now(), "message": message, "done": False}, chunk.logprobs)


def _with_logprobs(obj: dict[str, Any], raw: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Ollama's ``logprobs`` (omitted when not asked for); top_logprobs is omitempty in Go."""
    if raw is not None:
        obj["logprobs"] = [{k: v for k, v in e.items() if k != "top_logprobs" or v} for e in lp.entries(raw)]
    return obj


def tool_calls(r: Result) -> list[dict[str, Any]]:
    """Ollama's shape: arguments are an object, ``index`` counts the calls."""
    return [{"id": c.id, "function": {"index": i, "name": c.name, "arguments": c.arguments}}
            for i, c in enumerate(r.tool_calls)]


def chat_final(model: str, r: Result, content: str = "", *, whole: bool = False) -> dict[str, Any]:
    """The last line of a stream, or (``whole``) the one non-streamed reply."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if whole and r.thinking:
        message["thinking"] = r.thinking
    if whole and r.tool_calls:
        message["tool_calls"] = tool_calls(r)
    return _with_logprobs({"model": model, "created_at": now(), "message": message, "done": True, **metrics(r)},
                          r.logprobs if whole else None)


def chat_tool_chunk(model: str, r: Result) -> dict[str, Any]:
    """Streamed tool calls arrive in a chunk of their own, before the final one."""
    return {"model": model, "created_at": now(),
            "message": {"role": "assistant", "content": "", "tool_calls": tool_calls(r)}, "done": False}


def generate_chunk(model: str, chunk: Chunk) -> dict[str, Any]:
    out = {"model": model, "created_at": now(), "response": chunk.text, "done": False}
    if chunk.thinking:
        out["thinking"] = chunk.thinking
    return _with_logprobs(out, chunk.logprobs)


def generate_final(model: str, r: Result, response: str = "", *, whole: bool = False) -> dict[str, Any]:
    out = {"model": model, "created_at": now(), "response": response, "done": True, **metrics(r)}
    if r.context is not None:  # Ollama's order: context before the durations
        out = {**{k: out[k] for k in ("model", "created_at", "response", "done", "done_reason")},
               "context": r.context, **out}
    if whole and r.thinking:
        out["thinking"] = r.thinking
    return _with_logprobs(out, r.logprobs if whole else None)


def load_reply(model: str, kind: str, *, chat: bool) -> dict[str, Any]:
    """The reply to an empty prompt/messages: ``kind`` is "load" or "unload"."""
    body: dict[str, Any] = {"model": model, "created_at": now()}
    if chat:
        body["message"] = {"role": "assistant", "content": ""}
    else:
        body["response"] = ""
    return {**body, "done": True, "done_reason": kind}


# -- model management ---------------------------------------------------------------

def details(m: Manifest) -> dict[str, Any]:
    return {
        "parent_model": m.parent,
        "format": m.format,
        "family": m.family,
        "families": m.families or ([m.family] if m.family else None),
        "parameter_size": m.parameter_size,
        "quantization_level": m.quantization,
    }


def tag_entry(m: Manifest) -> dict[str, Any]:
    return {"name": m.name, "model": m.name, "modified_at": m.modified.isoformat(), "size": m.size,
            "digest": m.digest, "details": details(m)}


def parameters_text(params: dict[str, Any]) -> str:
    """Modelfile-style ``key<spaces>value`` lines, strings JSON-quoted (Continue parses them)."""
    lines = []
    for key, value in params.items():
        for v in value if isinstance(value, list) else [value]:
            lines.append(f"{key:<30} {json.dumps(v)}")
    return "\n".join(lines)


def modelfile(m: Manifest) -> str:
    out = [f"# Modelfile generated by kiln\n# To build a new Modelfile based on this, replace FROM with:\n"
           f"# FROM {m.name}\n", f"FROM {m.files[0].path if m.files else m.name}"]
    if m.chat_template:
        out.append(f'TEMPLATE """{m.chat_template}"""')
    if m.system:
        out.append(f'SYSTEM """{m.system}"""')
    for key, value in m.parameters.items():
        for v in value if isinstance(value, list) else [value]:
            out.append(f"PARAMETER {key} {json.dumps(v) if isinstance(v, str) else v}")
    for msg in m.messages:
        out.append(f"MESSAGE {msg.get('role')} {msg.get('content')}")
    if m.license:
        out.append(f'LICENSE """{m.license}"""')
    return "\n".join(out) + "\n"


def show(m: Manifest, *, verbose: bool = False) -> dict[str, Any]:
    """``/api/show``'s body for a stored model (the route adds what a load gives it)."""
    info = dict(m.model_info)
    if not verbose:
        info = {k: v for k, v in info.items() if not isinstance(v, list) or len(v) <= 64}
    body: dict[str, Any] = {
        "license": m.license or "",
        "modelfile": modelfile(m),
        "parameters": parameters_text(m.parameters),
        "template": m.chat_template or "",
        "details": details(m),
        "model_info": info,
        "capabilities": capabilities(m),
        "modified_at": m.modified.isoformat(),
    }
    if m.system:
        body["system"] = m.system
    if m.messages:
        body["messages"] = m.messages
    if m.backend != "llamacpp":
        body["kiln"] = {"backend": m.backend, "devices": m.devices, **{k: v for k, v in m.extra.items()}}
    return body


def create_request(req: CreateRequest) -> NewModel:
    """``/api/create``'s body as the model to create; what kiln does not do is refused."""
    if req.quantize:
        raise BadRequest("quantize is not supported by kiln create; use kiln compile for OpenVINO "
                         "weights or quantize the GGUF with llama.cpp's llama-quantize")
    if req.adapters:
        raise BadRequest("adapters (LoRA) are not supported yet")
    if req.modelfile:
        raise BadRequest("the modelfile field is no longer part of the API: send from, files, system, "
                         "template and parameters (kiln create -f Modelfile does that for you)")
    messages = None if req.messages is None else [
        {"role": x.role.lower(), "content": x.content or ""} for x in req.messages]
    license = "\n".join(req.license) if isinstance(req.license, list) else req.license
    return NewModel(name=req.model or req.name or "", base=req.from_, files=req.files, template=req.template,
                    system=req.system, parameters=req.parameters, messages=messages, license=license,
                    policy=req.policy)
