"""Tool calling for every chat model.

* A model whose chat template renders ``tools`` gets them through its template; any
  other chat model gets them in a system message, in the Hermes format, which small
  instruct models follow best.
* Calls are parsed from the output in the common formats: Hermes/Qwen
  ``<tool_call>{...}</tool_call>``, Mistral ``[TOOL_CALLS] [...]``, and a bare Llama 3
  JSON object ``{"name": ..., "parameters": ...}``.
* ``tool_choice: "required"`` or a named function is enforced by grammar: the output
  is constrained to a JSON call of the allowed function(s) with schema-valid
  arguments, so it always parses.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from server.errors import BadRequest

TOOL_CALL_OPEN = "<tool_call>"
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_MISTRAL = re.compile(r"\[TOOL_CALLS\]\s*(\[.*\]|\{.*\})", re.S)


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


def functions(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The function definitions of OpenAI/Ollama-style tools, checked."""
    out = []
    for t in tools:
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRequest("each tool must be {\"type\": \"function\", \"function\": {\"name\": ..., ...}}")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise BadRequest(f"tool {fn['name']}: parameters must be a JSON schema object")
        out.append({**fn, "parameters": params})
    return out


def choose(tools: list[dict[str, Any]], choice: Any) -> list[dict[str, Any]] | None:
    """The functions a call must be made to, or None when the model may answer in text."""
    fns = functions(tools)
    if choice in (None, "auto"):
        return None
    if choice == "none":
        return []
    if choice == "required":
        return fns
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    chosen = [f for f in fns if f["name"] == name]
    if not chosen:
        raise BadRequest(f"tool_choice names {name!r}, which is not among the tools")
    return chosen


def call_schema(fns: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON schema of one call to any of ``fns`` (for the grammar)."""
    variants = [{"type": "object",
                 "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
                 "required": ["name", "arguments"], "additionalProperties": False} for f in fns]
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def system_prompt(fns: list[dict[str, Any]]) -> str:
    """Hermes-style tool instructions for a model whose template has no tools section."""
    sigs = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in fns)
    return ("You are a function calling AI model. You may call one or more functions to assist with the user "
            "query. Here are the available tools:\n<tools>\n" + sigs + "\n</tools>\n"
            "To call a function, answer with a JSON object of its name and arguments inside "
            "<tool_call></tool_call> tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
            "<args-json-object>}\n</tool_call>")


def _call(obj: Any, names: set[str]) -> ToolCall | None:
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(name, str) or name not in names or not isinstance(args, dict):
        return None
    return ToolCall(name, args)


def parse(text: str, fns: list[dict[str, Any]]) -> tuple[str, list[ToolCall]]:
    """Splits model output into the text around tool calls and the calls themselves.
    Only calls to known functions with object arguments count; anything else stays text."""
    names = {f["name"] for f in fns}
    calls: list[ToolCall] = []
    if TOOL_CALL_OPEN in text:
        for body in _HERMES.findall(text):
            call = _call(_loads(body), names)
            if call:
                calls.append(call)
        if calls:
            return _HERMES.sub("", text).strip(), calls
    m = _MISTRAL.search(text)
    if m:
        items = _loads(m.group(1))
        for item in items if isinstance(items, list) else [items]:
            call = _call(item, names)
            if call:
                calls.append(call)
        if calls:
            return text[: m.start()].strip(), calls
    stripped = text.strip()
    if stripped.startswith("{") and stripped.endswith("}"):
        call = _call(_loads(stripped), names)
        if call:
            return "", [call]
    return text, []


def _loads(s: str) -> Any:
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        return None


def history_for_template(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation for a template without a tools section: earlier calls become
    ``<tool_call>`` text in the assistant turn, tool results ``<tool_response>`` user turns."""
    out = []
    for m in messages:
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = "\n".join(f"{TOOL_CALL_OPEN}\n" + json.dumps({"name": c["function"]["name"],
                                                                  "arguments": c["function"]["arguments"]})
                              + "\n</tool_call>" for c in m["tool_calls"])
            out.append({"role": "assistant", "content": ((m.get("content") or "") + "\n" + calls).strip()})
        elif m.get("role") == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m.get('content', '')}\n</tool_response>"})
        else:
            out.append(m)
    return out


class ToolStream:
    """Splits a streamed answer into text for the client and tool calls.

    With a forced call (``forced``) the whole output is the call. Otherwise text flows
    to the client until ``<tool_call>`` shows up (a partial tag is held back); from
    there on the output is kept and parsed at the end."""

    def __init__(self, fns: list[dict[str, Any]], forced: bool) -> None:
        self.fns, self.forced = fns, forced
        self.held = ""
        self.capturing = forced

    def feed(self, text: str) -> str:
        if self.capturing:
            self.held += text
            return ""
        buf = self.held + text
        i = buf.find(TOOL_CALL_OPEN)
        if i >= 0:
            self.capturing, self.held = True, buf[i:]
            return buf[:i]
        keep = next((n for n in range(min(len(TOOL_CALL_OPEN) - 1, len(buf)), 0, -1)
                     if buf.endswith(TOOL_CALL_OPEN[:n])), 0)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep]

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The text still to send, and the calls."""
        text, self.held = self.held, ""
        if not text:
            return "", []
        if self.forced:  # the grammar makes it a call, unless num_predict cut it short
            call = _call(_loads(text.strip()), {f["name"] for f in self.fns})
            return ("", [call]) if call else (text, [])
        return parse(text, self.fns)
