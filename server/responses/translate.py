"""Responses API wire <-> the internal ``Inference``: pure functions, no I/O.

Input items become the chat messages every dialect uses (``function_call`` items an
assistant turn's ``tool_calls``, ``function_call_output`` items ``tool`` messages,
``reasoning`` items the next assistant turn's ``thinking``); the output is a list of
items (``reasoning``, ``message``, ``function_call``), streamed as the event sequence
the OpenAI SDK's ``responses.stream`` accumulates: ``response.created``,
``response.in_progress``, per item ``response.output_item.added`` ... ``.done``, then
``response.completed`` (or ``response.incomplete`` when it was cut)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from backends.base import Chunk, FinishReason
from server.errors import BadRequest
from server.inference import Inference, Result
from server.openai.translate import OPENAI_DEFAULTS, response_format, sampling_options
from server.responses.protocol import ResponsesRequest
from server.tools import ToolCall

STATELESS = ("kiln keeps no responses (it is stateless, as Ollama's /v1/responses is): send the whole "
             "conversation in input instead")


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _content(content: Any, where: str) -> tuple[str, list[str]]:
    if content is None or isinstance(content, str):
        return content or "", []
    if not isinstance(content, list):
        raise BadRequest(f"{where}.content: must be a string or a list of content parts")
    texts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text"):
            texts.append(str(part.get("text", "")))
        elif kind == "input_image":
            images.append(str(part.get("image_url") or part.get("file_id") or ""))
        elif kind == "refusal":
            texts.append(str(part.get("refusal", "")))
        else:
            raise BadRequest(f"{where}.content: unsupported content part type {kind!r}")
    return "\n".join(texts), images


def _arguments(raw: Any, where: str) -> dict[str, Any]:
    try:
        args = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError:
        raise BadRequest(f"{where}.arguments: not valid JSON: {raw!r}") from None
    if not isinstance(args, dict):
        raise BadRequest(f"{where}.arguments: must be a JSON object")
    return args


def _messages(req: ResponsesRequest) -> tuple[list[dict[str, Any]], list[str]]:
    out: list[dict[str, Any]] = []
    if req.instructions:
        out.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        if not req.input:
            raise BadRequest("input: must not be empty")
        return out + [{"role": "user", "content": req.input}], []
    if not req.input:
        raise BadRequest("input: must not be empty")
    images: list[str] = []
    thinking = ""
    for i, item in enumerate(req.input):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = str(item.get("role", ""))
            role = "system" if role == "developer" else role
            if role not in ("system", "user", "assistant"):
                raise BadRequest(f"{where}.role: must be user, assistant, system or developer, got {role!r}")
            text, imgs = _content(item.get("content"), where)
            images += imgs
            msg: dict[str, Any] = {"role": role, "content": text}
            if role == "assistant" and thinking:
                msg["thinking"], thinking = thinking, ""
            out.append(msg)
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": str(item.get("name", "")), "arguments": _arguments(item.get("arguments"),
                                                                                              where)}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":  # its text, then its calls: one turn
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
            if thinking:
                out[-1]["thinking"], thinking = thinking, ""
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _content(output, where)[0]
            out.append({"role": "tool", "content": text, "tool_call_id": str(item.get("call_id", ""))})
        elif kind == "reasoning":
            parts = (item.get("content") or []) + (item.get("summary") or [])
            thinking += "".join(str(p.get("text", "")) for p in parts if isinstance(p, dict))
        elif kind == "item_reference":
            raise BadRequest(f"{where}: item_reference needs a stored response; {STATELESS}")
        else:
            raise BadRequest(f"{where}.type: unsupported input item type {kind!r}")
    return out, images


def _tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if not tools:
        return None
    out = []
    for i, t in enumerate(tools):
        if t.get("type") != "function":
            raise BadRequest(f"tools[{i}].type: only function tools are available on kiln, got {t.get('type')!r}")
        if not isinstance(t.get("name"), str) or not t["name"]:
            raise BadRequest(f"tools[{i}].name: required")
        fn = {k: t[k] for k in ("name", "description", "parameters") if t.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any) -> Any:
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise BadRequest(f"tool_choice: must be auto, none, required or {{type: function, name}}, got {choice!r}")


def _format(text: dict[str, Any] | None) -> Any:
    fmt = (text or {}).get("format")
    if not fmt:
        return None
    if fmt.get("type") == "json_schema":  # the Responses API has the schema beside the name, not nested
        return response_format({"type": "json_schema", "json_schema": {"schema": fmt.get("schema")}})
    return response_format(fmt)


def to_internal(req: ResponsesRequest, num_ctx_header: str | None = None) -> Inference:
    if not req.model:
        raise BadRequest("model: you must provide a model parameter")
    if req.previous_response_id:
        raise BadRequest(f"previous_response_id is not supported: {STATELESS}")
    if req.conversation:
        raise BadRequest(f"conversation is not supported: {STATELESS}")
    messages, images = _messages(req)
    think = None
    if req.reasoning and req.reasoning.get("effort"):
        think = {"minimal": False, "none": False}.get(req.reasoning["effort"], req.reasoning["effort"])
    return Inference(model=req.model, messages=messages, options=sampling_options(req, req.max_output_tokens,
                                                                                  num_ctx_header),
                     format=_format(req.text), tools=_tools(req.tools), tool_choice=_tool_choice(req.tool_choice),
                     think=think, images=images or None, fallback=dict(OPENAI_DEFAULTS),
                     fallback_from="OpenAI's default")


# -- the response ---------------------------------------------------------------------

def _usage(r: Result) -> dict[str, Any]:
    u = r.usage
    out: dict[str, Any] = {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": u.cached_tokens},
                           "output_tokens": u.completion_tokens, "total_tokens": u.prompt_tokens + u.completion_tokens}
    if not r.thinking:  # with thinking, kiln does not know how many of the tokens it took
        out["output_tokens_details"] = {"reasoning_tokens": 0}
    return out


def _call_item(c: ToolCall, item_id: str, status: str = "completed", arguments: str | None = None) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": c.id, "name": c.name, "status": status,
            "arguments": json.dumps(c.arguments, ensure_ascii=False) if arguments is None else arguments}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "message", "id": item_id, "role": "assistant", "status": status,
            "content": [_text_part(text)] if status != "in_progress" else []}


def _reasoning_item(item_id: str, thinking: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id, "summary": [],
            "content": [{"type": "reasoning_text", "text": thinking}] if thinking else []}


class ResponseBuilder:
    """One response: the whole object (``whole``) or its stream events (``start``,
    ``content``, ``finish``, ``failed``), as (event name, data) pairs."""

    def __init__(self, req: ResponsesRequest) -> None:
        self.req = req
        self.id, self.created = _id("resp"), int(time.time())
        self.seq = 0
        self.items: list[dict[str, Any]] = []  # finished output items
        self.open: str | None = None  # "reasoning" or "message", being streamed
        self.item_id = ""
        self.buf: list[str] = []

    def _response(self, status: str, r: Result | None = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
        req = self.req
        fmt = (req.text or {}).get("format") or {"type": "text"}
        out: dict[str, Any] = {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "model": req.model, "output": list(self.items), "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens, "temperature": req.temperature, "top_p": req.top_p,
            "tools": req.tools or [], "tool_choice": req.tool_choice or "auto",
            "parallel_tool_calls": req.parallel_tool_calls if req.parallel_tool_calls is not None else True,
            "text": {"format": fmt}, "reasoning": req.reasoning, "previous_response_id": None, "store": False,
            "metadata": req.metadata or {}, "truncation": "disabled", "error": error, "incomplete_details": None,
            "usage": None}
        if r is not None:
            out["usage"] = _usage(r)
            out["completed_at"] = int(time.time())
            if status == "incomplete":
                out["incomplete_details"] = {"reason": "max_output_tokens"}
        return out

    def _event(self, kind: str, **data: Any) -> tuple[str, dict[str, Any]]:
        ev = (kind, {"type": kind, "sequence_number": self.seq, **data})
        self.seq += 1
        return ev

    @staticmethod
    def status(r: Result) -> str:
        """The loop guard's stop is "incomplete" too: the answer was cut, not finished."""
        return "incomplete" if r.finish in (FinishReason.LENGTH, FinishReason.LOOP) and not r.tool_calls \
            else "completed"

    def whole(self, text: str, r: Result) -> dict[str, Any]:
        if r.thinking:
            self.items.append(_reasoning_item(_id("rs"), r.thinking))
        if text or not r.tool_calls:
            self.items.append(_message_item(_id("msg"), text, "completed"))
        self.items += [_call_item(c, _id("fc")) for c in r.tool_calls]
        return self._response(self.status(r), r)

    # -- the stream --------------------------------------------------------------------
    def start(self) -> list[tuple[str, dict[str, Any]]]:
        return [self._event("response.created", response=self._response("in_progress")),
                self._event("response.in_progress", response=self._response("in_progress"))]

    def _open(self, kind: str) -> list[tuple[str, dict[str, Any]]]:
        out = self._close()
        self.open, self.item_id, self.buf = kind, _id("rs" if kind == "reasoning" else "msg"), []
        index = len(self.items)
        if kind == "reasoning":
            out.append(self._event("response.output_item.added", output_index=index,
                                   item={**_reasoning_item(self.item_id, ""), "status": "in_progress"}))
            out.append(self._event("response.content_part.added", item_id=self.item_id, output_index=index,
                                   content_index=0, part={"type": "reasoning_text", "text": ""}))
        else:
            out.append(self._event("response.output_item.added", output_index=index,
                                   item=_message_item(self.item_id, "", "in_progress")))
            out.append(self._event("response.content_part.added", item_id=self.item_id, output_index=index,
                                   content_index=0, part=_text_part("")))
        return out

    def _close(self) -> list[tuple[str, dict[str, Any]]]:
        if self.open is None:
            return []
        text, index, where = "".join(self.buf), len(self.items), dict(item_id=self.item_id, content_index=0)
        if self.open == "reasoning":
            item = _reasoning_item(self.item_id, text)
            out = [self._event("response.reasoning_text.done", output_index=index, text=text, **where),
                   self._event("response.content_part.done", output_index=index,
                               part={"type": "reasoning_text", "text": text}, **where)]
        else:
            item = _message_item(self.item_id, text, "completed")
            out = [self._event("response.output_text.done", output_index=index, text=text, logprobs=[], **where),
                   self._event("response.content_part.done", output_index=index, part=_text_part(text), **where)]
        out.append(self._event("response.output_item.done", output_index=index, item=item))
        self.items.append(item)
        self.open = None
        return out

    def content(self, chunk: Chunk) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for kind, piece, event in (("reasoning", chunk.thinking, "response.reasoning_text.delta"),
                                   ("message", chunk.text, "response.output_text.delta")):
            if not piece:
                continue
            if self.open != kind:
                out += self._open(kind)
            self.buf.append(piece)
            extra: dict[str, Any] = {"logprobs": []} if kind == "message" else {}
            out.append(self._event(event, item_id=self.item_id, output_index=len(self.items), content_index=0,
                                   delta=piece, **extra))
        return out

    def finish(self, r: Result) -> list[tuple[str, dict[str, Any]]]:
        if not r.tool_calls and self.open != "message" and not any(i["type"] == "message" for i in self.items):
            out = self._open("message")  # an empty answer is still a message, as in whole()
        else:
            out = []
        out += self._close()
        for c in r.tool_calls:
            index, item_id = len(self.items), _id("fc")
            item = _call_item(c, item_id)
            out.append(self._event("response.output_item.added", output_index=index,
                                   item=_call_item(c, item_id, "in_progress", "")))
            out.append(self._event("response.function_call_arguments.delta", item_id=item_id, output_index=index,
                                   delta=item["arguments"]))
            out.append(self._event("response.function_call_arguments.done", item_id=item_id, output_index=index,
                                   name=c.name, arguments=item["arguments"]))
            out.append(self._event("response.output_item.done", output_index=index, item=item))
            self.items.append(item)
        status = self.status(r)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return out + [self._event(kind, response=self._response(status, r))]

    def failed(self, message: str, started: bool) -> list[tuple[str, dict[str, Any]]]:
        out = [] if started else self.start()
        error = {"code": "server_error", "message": message}
        return out + [self._event("response.failed", response=self._response("failed", error=error))]
