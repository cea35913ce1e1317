"""OpenAI wire <-> the internal ``Inference``: pure functions, no I/O
(Ollama's openai/openai.go: FromChatRequest, ToChatCompletion, ToChunk...)."""

from __future__ import annotations

import base64
import json
import struct
import time
import uuid
from collections.abc import Sequence
from typing import Any

from backends.base import Chunk, FinishReason
from backends.store import Manifest, ModelName
from server import logprobs as lp
from server import options as opts
from server.errors import BadRequest
from server.inference import Inference, Result
from server.openai.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest

FINGERPRINT = "fp_kiln"
MAX_N = 128  # OpenAI's; the model's parallel sequences bound it further (server/scheduler.py)


def _range(name: str, value: float | None, lo: float, hi: float) -> None:
    if value is not None and not lo <= value <= hi:
        raise BadRequest(f"{name} must be between {lo:g} and {hi:g}, got {value:g}")


# OpenAI's defaults differ from Ollama's: temperature and top_p are 1.0 when absent. They
# apply only where neither the model's parameters nor its policy set a default (the
# policy's story must hold for OpenAI clients too), and X-Kiln-Adjusted names them.
OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0}
NUM_CTX_HEADER = "x-kiln-num-ctx"


def _num_ctx(req: ChatCompletionRequest | CompletionRequest, header: str | None) -> int | None:
    """``num_ctx`` from the body (top-level, as clients send it through ``extra_body``,
    or in an Ollama ``options`` object), else from the ``X-Kiln-Num-Ctx`` header."""
    extra = req.model_extra or {}
    if extra.get("num_ctx") is not None:
        return opts.check({"num_ctx": extra["num_ctx"]})["num_ctx"]
    if header is not None:
        try:
            value = int(header.strip())
        except ValueError:
            value = 0
        if value < 1:
            raise BadRequest(f"the X-Kiln-Num-Ctx header must be a positive integer (tokens), got {header!r}")
        return opts.check({"num_ctx": value})["num_ctx"]
    return None


def sampling_options(req: Any, max_tokens: int | None,
             num_ctx_header: str | None = None) -> dict[str, Any]:
    """OpenAI sampling fields as Ollama options, over an Ollama ``options`` object
    when the body has one (a kiln extension, for ``num_ctx`` and the like)."""
    _range("temperature", req.temperature, 0, 2)
    _range("top_p", req.top_p, 0, 1)
    _range("frequency_penalty", req.frequency_penalty, -2, 2)
    _range("presence_penalty", req.presence_penalty, -2, 2)
    if max_tokens is not None and not 1 <= max_tokens <= 1 << 31:
        raise BadRequest(f"max_tokens must be between 1 and {1 << 31}, got {max_tokens}")
    if req.n is not None and not 1 <= req.n <= MAX_N:
        raise BadRequest(f"n must be between 1 and {MAX_N}")
    if req.seed is not None and not -(1 << 63) <= req.seed < 1 << 63:
        raise BadRequest("seed is out of range")
    extra = req.model_extra or {}
    o: dict[str, Any] = opts.check(extra.get("options"))
    if extra.get("num_ctx") is not None or "num_ctx" not in o:  # top-level > options > header
        num_ctx = _num_ctx(req, num_ctx_header)
        if num_ctx is not None:
            o["num_ctx"] = num_ctx
    if req.temperature is not None:
        o["temperature"] = req.temperature
    if req.top_p is not None:
        o["top_p"] = req.top_p
    if max_tokens is not None:
        o["num_predict"] = max_tokens
    if req.seed is not None:
        o["seed"] = req.seed
    if req.stop is not None:
        o["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
        if len(o["stop"]) > 16:
            raise BadRequest("stop: at most 16 sequences")
    if req.frequency_penalty is not None:
        o["frequency_penalty"] = req.frequency_penalty
    if req.presence_penalty is not None:
        o["presence_penalty"] = req.presence_penalty
    return o


def _content(msg: ChatMessage) -> tuple[str, list[str]]:
    """Text and images of a message whose content may be a list of parts."""
    if msg.content is None or isinstance(msg.content, str):
        return msg.content or "", []
    texts, images = [], []
    for part in msg.content:
        kind = part.get("type")
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image_url":
            url = part.get("image_url")
            images.append(url.get("url", "") if isinstance(url, dict) else str(url))
        else:
            raise BadRequest(f"unsupported content part type {kind!r}")
    return "\n".join(texts), images


def _message(msg: ChatMessage) -> tuple[dict[str, Any], list[str]]:
    role = msg.role.lower()
    if role == "developer":
        role = "system"
    if role not in ("system", "user", "assistant", "tool"):
        raise BadRequest(f"invalid role {msg.role!r}")
    text, images = _content(msg)
    d: dict[str, Any] = {"role": role, "content": text}
    if msg.tool_calls:
        calls = []
        for tc in msg.tool_calls:
            fn = tc.get("function") or {}
            args = fn.get("arguments") or "{}"
            try:
                args = json.loads(args) if isinstance(args, str) else args
            except json.JSONDecodeError:
                raise BadRequest(f"tool call arguments are not valid JSON: {args!r}") from None
            calls.append({"id": tc.get("id"), "type": "function",
                          "function": {"name": fn.get("name", ""), "arguments": args}})
        d["tool_calls"] = calls
    if msg.tool_call_id:
        d["tool_call_id"] = msg.tool_call_id
    if msg.name:
        d["name"] = msg.name
    if msg.reasoning_content:
        d["thinking"] = msg.reasoning_content
    return d, images


def response_format(rf: dict[str, Any] | None) -> Any:
    if not rf:
        return None
    kind = rf.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        schema = (rf.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise BadRequest("response_format.json_schema.schema must be a JSON schema object")
        return schema
    raise BadRequest(f"unsupported response_format type {kind!r}")


def chat_to_internal(req: ChatCompletionRequest, num_ctx_header: str | None = None) -> Inference:
    if not req.model:
        raise BadRequest("you must provide a model parameter")
    if not req.messages:
        raise BadRequest("messages must contain at least one message")
    if req.top_logprobs is not None and not req.logprobs:
        raise BadRequest("top_logprobs requires logprobs to be true")
    logprobs = lp.wanted(req.logprobs, req.top_logprobs)
    messages, images = [], []
    for m in req.messages:
        d, imgs = _message(m)
        messages.append(d)
        images += imgs
    think = None
    if req.reasoning_effort:
        think = {"minimal": False, "none": False}.get(req.reasoning_effort, req.reasoning_effort)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    return Inference(model=req.model, messages=messages, options=sampling_options(req, max_tokens, num_ctx_header),
                     format=response_format(req.response_format), tools=req.tools or None,
                     tool_choice=req.tool_choice,
                     think=think, images=images or None, fallback=dict(OPENAI_DEFAULTS),
                     fallback_from="OpenAI's default", logprobs=logprobs, logit_bias=lp.bias(req.logit_bias),
                     n=req.n or 1)


MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions


MAX_PROMPTS = 64  # prompts in one /v1/completions request; each is a sequence (or n) of its own


def completion_to_internal(req: CompletionRequest, num_ctx_header: str | None = None) -> list[Inference]:
    """One Inference per prompt (OpenAI's completions take a list of them; prompt i's
    choice j is choice ``i * n + j`` of the response)."""
    if not req.model:
        raise BadRequest("you must provide a model parameter")
    prompts = prompt_input(req.prompt)
    if req.best_of not in (None, 1):
        raise BadRequest("best_of must be 1")
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_COMPLETION_LOGPROBS:
        raise BadRequest(f"logprobs must be between 0 and {MAX_COMPLETION_LOGPROBS}")
    if req.echo and req.logprobs is not None:
        raise BadRequest("echo with logprobs is not supported: it needs the prompt's log-probabilities, which kiln "
                         "does not compute")
    if req.echo and req.suffix:
        raise BadRequest("echo cannot be combined with suffix")
    if any(not isinstance(p, str) for p in prompts) and (req.echo or req.suffix):
        raise BadRequest(f"{'echo' if req.echo else 'suffix'} needs the prompt as text, not as token ids")
    options = sampling_options(req, req.max_tokens, num_ctx_header)
    bias = lp.bias(req.logit_bias)
    return [Inference(model=req.model, prompt=p if isinstance(p, str) else "",
                      prompt_ids=None if isinstance(p, str) else p, raw=True, suffix=req.suffix,
                      options=dict(options), fallback=dict(OPENAI_DEFAULTS), fallback_from="OpenAI's default",
                      logprobs=req.logprobs, logit_bias=bias, n=req.n or 1)
            for p in prompts]


def finish_reason(r: Result) -> str:
    """Only OpenAI's values; the loop guard's stop is "length" (the answer was cut)."""
    if r.tool_calls:
        return "tool_calls"
    return "length" if r.finish in (FinishReason.LENGTH, FinishReason.LOOP) else "stop"


def tool_calls(r: Result) -> list[dict[str, Any]]:
    """OpenAI's shape: arguments are a JSON string; ``index`` counts the calls."""
    return [{"index": i, "id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
            for i, c in enumerate(r.tool_calls)]


def usage(r: Result) -> dict[str, Any]:
    u = r.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _each(text: str, r: Result) -> list[tuple[str, Result]]:
    """(text, result) of every choice: one, or ``Result.choices`` (n > 1)."""
    return [(c.text, c) for c in r.choices] if r.choices else [(text, r)]


def chat_completion(cid: str, model: str, text: str, r: Result) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": FINGERPRINT,
            "choices": [_chat_choice(i, t, c) for i, (t, c) in enumerate(_each(text, r))], "usage": usage(r)}


def _chat_choice(index: int, text: str, r: Result) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if r.thinking:
        message["reasoning_content"] = r.thinking
    if r.tool_calls:
        message["content"] = text or None
        message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in tool_calls(r)]
    return {"index": index, "message": message, "finish_reason": finish_reason(r), "logprobs": chat_logprobs(r.logprobs)}


class _Stream:
    """Builds the SSE chunks of one streamed completion."""

    prefix = object_type = ""

    def __init__(self, model: str, include_usage: bool) -> None:
        self.id, self.model, self.include_usage = new_id(self.prefix), model, include_usage
        self.created = int(time.time())

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        out = {"id": self.id, "object": self.object_type, "created": self.created, "model": self.model,
               "system_fingerprint": FINGERPRINT, "choices": choices, **extra}
        if self.include_usage and "usage" not in out:
            out["usage"] = None  # OpenAI: null on every chunk but the last when usage is asked for
        return out

    def _choice(self, logprobs: dict[str, Any] | None = None, index: int = 0, **fields: Any) -> dict[str, Any]:
        return {"index": index, **fields, "logprobs": logprobs}

    def finish(self, r: Result) -> list[dict[str, Any]]:
        out = []
        for i, (_, c) in enumerate(_each("", r)):
            out += self._tool_chunks(c, i) + [self._chunk([self._finish_choice(finish_reason(c), i)])]
        if self.include_usage:
            out.append(self._chunk([], usage=usage(r)))
        return out

    def _finish_choice(self, reason: str, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def _tool_chunks(self, r: Result, index: int) -> list[dict[str, Any]]:
        return []


class ChatStream(_Stream):
    prefix, object_type = "chatcmpl", "chat.completion.chunk"

    def role(self, index: int = 0) -> dict[str, Any]:
        return self._chunk([self._choice(delta={"role": "assistant", "content": ""}, finish_reason=None,
                                         index=index)])

    def content(self, chunk: Chunk) -> dict[str, Any]:
        delta: dict[str, Any] = {"content": chunk.text} if chunk.text else {}
        if chunk.thinking:
            delta["reasoning_content"] = chunk.thinking
        return self._chunk([self._choice(delta=delta, finish_reason=None, logprobs=chat_logprobs(chunk.logprobs),
                                         index=chunk.index)])

    def _finish_choice(self, reason: str, index: int) -> dict[str, Any]:
        return self._choice(delta={}, finish_reason=reason, index=index)

    def _tool_chunks(self, r: Result, index: int) -> list[dict[str, Any]]:
        """One delta per call, whole: ``index`` and ``id`` on each, as the SDK's
        stream helpers need."""
        return [self._chunk([self._choice(delta={"tool_calls": [call]}, finish_reason=None, index=index)])
                for call in tool_calls(r)]


def chat_logprobs(raw: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    return None if raw is None else {"content": lp.entries(raw), "refusal": None}


def completion_logprobs(raw: list[dict[str, Any]] | None, offset: int = 0) -> dict[str, Any] | None:
    """The legacy completions shape; ``text_offset`` counts characters from the start of
    the choice's text (``offset``: where this chunk's text starts)."""
    if raw is None:
        return None
    offsets = []
    for e in raw:
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": [e["token"] for e in raw], "token_logprobs": [e["logprob"] for e in raw],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e.get("top") or []} for e in raw],
            "text_offset": offsets}


def completion(cid: str, model: str, text: str, r: Result, echo: Sequence[str] = ()) -> dict[str, Any]:
    """``echo``: each choice's prompt, written before its text (empty: no echo)."""
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": FINGERPRINT,
            "choices": [{"text": (echo[i] if echo else "") + t, "index": i,
                         "logprobs": completion_logprobs(c.logprobs),
                         "finish_reason": finish_reason(c)} for i, (t, c) in enumerate(_each(text, r))],
            "usage": usage(r)}


class CompletionStream(_Stream):
    prefix, object_type = "cmpl", "text_completion"
    def __init__(self, model: str, include_usage: bool) -> None:
        super().__init__(model, include_usage)
        self.offsets: dict[int, int] = {}  # characters of each choice's text sent so far (text_offset)

    def content(self, chunk: Chunk) -> dict[str, Any]:
        offset = self.offsets.get(chunk.index, 0)
        out = self._chunk([self._choice(text=chunk.text, finish_reason=None, index=chunk.index,
                                        logprobs=completion_logprobs(chunk.logprobs, offset))])
        self.offsets[chunk.index] = offset + len(chunk.text)
        return out

    def _finish_choice(self, reason: str, index: int) -> dict[str, Any]:
        return self._choice(text="", finish_reason=reason, index=index)


def _ids(value: Any) -> bool:
    """A non-empty list of token ids (JSON integers; true and false are not)."""
    return isinstance(value, list) and bool(value) and all(type(v) is int for v in value)


def _one_or_many(value: Any, field: str) -> list[str | list[int]]:
    """OpenAI's four forms of a text input: a string, a list of strings, a list of token
    ids, a list of lists of token ids; each string or token list is one input."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise BadRequest(f"{field} must be a string, a list of strings, a list of token ids or a list of "
                         f"lists of token ids")
    if _ids(value):
        return [list(value)]
    out: list[str | list[int]] = []
    for i, v in enumerate(value):
        if isinstance(v, str):
            out.append(v)
        elif _ids(v):
            out.append(list(v))
        elif type(v) is int or (isinstance(v, list) and any(isinstance(x, str) for x in v)):
            # llama.cpp's server reads [12, "text", 34] as one prompt, the text tokenized in place;
            # OpenAI's API has no such form, and where special tokens and BOS go in it is llama.cpp's own.
            raise BadRequest(f"{field}: a list mixing token ids and strings is not supported; "
                             f"give text or token ids")
        elif isinstance(v, list) and not v:
            raise BadRequest(f"{field}[{i}]: the token list is empty")
        else:
            raise BadRequest(f"{field}[{i}] must be a string or a list of token ids")
    return out


def prompt_input(value: Any) -> list[str | list[int]]:
    """A completion's prompts: each its text or its token ids (None: one empty prompt)."""
    if value is None:
        return [""]
    if isinstance(value, list) and not value:
        raise BadRequest("prompt must not be an empty list")
    prompts = _one_or_many(value, "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise BadRequest(f"prompt: at most {MAX_PROMPTS} prompts per request, got {len(prompts)}")
    return prompts


def embedding_input(value: Any) -> list[str | list[int]]:
    """The texts to embed, each a string or token ids."""
    return _one_or_many(value, "input")


def encode_embedding(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


def model_entry(m: Manifest) -> dict[str, Any]:
    ns = ModelName.parse(m.name).namespace
    return {"id": m.name, "object": "model", "created": int(m.modified.timestamp()),
            "owned_by": "library" if ns == "library" else ns}
