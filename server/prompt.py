"""Chat templates: the model's own Jinja template, rendered as Hugging Face renders it,
inside Jinja's sandbox.

A model file is untrusted input: llama-cpp-python rendered GGUF templates in a plain
Jinja environment and a crafted template ran code (CVE-2024-34359). The sandbox
refuses attribute access to internals, and the render is bounded in output size.
The gateway never calls ``render`` itself: ``server.render`` runs it in a child
process with CPU-time and memory limits.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from server.errors import BadRequest

log = logging.getLogger("kiln.prompt")

# Used when a model carries no template of its own (Ollama's default is {{ .Prompt }}).
# ChatML, because it is what most small instruct models were trained on; the log says so.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

MAX_PROMPT_CHARS = 16 << 20


class TemplateError(BadRequest):
    pass


def _raise(message: str) -> None:
    raise TemplateError(f"the chat template refused the messages: {message}")


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return dt.datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    # loopcontrols ({% break %}, {% continue %}): Hugging Face's environment has it,
    # and templates written for transformers use it.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.ChainableUndefined,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render(template: str | None, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
           bos_token: str | None = None, eos_token: str | None = None, add_generation_prompt: bool = True,
           extra: dict[str, Any] | None = None) -> str:
    """Renders the conversation into the prompt text the engine tokenizes."""
    source = template or FALLBACK_TEMPLATE
    if template is None:
        log.info("model has no chat template; using the ChatML fallback")
    try:
        tmpl = _compile(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"invalid chat template: {e.message} (line {e.lineno})") from None
    context: dict[str, Any] = {
        "messages": messages,
        "add_generation_prompt": add_generation_prompt,
        "bos_token": bos_token or "",
        "eos_token": eos_token or "",
        **(extra or {}),
    }
    if tools:
        context["tools"] = tools
    try:
        out = []
        size = 0
        for piece in tmpl.generate(**context):
            size += len(piece)
            if size > MAX_PROMPT_CHARS:
                raise TemplateError("the rendered prompt is larger than 16 MiB")
            out.append(piece)
        text = "".join(out)
    except (TemplateError, MemoryError):
        raise  # a MemoryError is the render process's memory limit (server/render.py)
    except jinja2.exceptions.SecurityError as e:
        raise TemplateError(f"the chat template tried an unsafe operation: {e}") from None
    except Exception as e:  # noqa: BLE001 - a broken template is the model's fault, say so
        raise TemplateError(f"rendering the chat template failed: {type(e).__name__}: {e}") from None
    return text


def supports(template: str | None, feature: str) -> bool:
    """Whether a template renders a feature (``tools``, ``thinking``), judged by what it reads."""
    if not template:
        return False
    if feature == "tools":
        return "tools" in template and ("tool_call" in template or "tool" in template)
    if feature == "thinking":
        return "<think>" in template or "enable_thinking" in template or "reasoning_content" in template
    if feature == "insert":
        return "suffix" in template.lower()
    return False
