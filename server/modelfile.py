"""Ollama's Modelfile, parsed on the client side (``kiln create -f``), as the ollama
CLI does: a local ``FROM`` file is uploaded as a blob, never read by the server."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

_INSTRUCTIONS = {"from", "parameter", "template", "system", "adapter", "license", "message", "requires"}


class ModelfileError(ValueError):
    pass


@dataclass
class Modelfile:
    from_: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    template: str | None = None
    system: str | None = None
    license: list[str] = field(default_factory=list)
    messages: list[dict[str, str]] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)


def _value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse(text: str) -> Modelfile:
    mf = Modelfile()
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        cmd = word.lower()
        if cmd not in _INSTRUCTIONS:
            raise ModelfileError(f"line {i}: unknown instruction {word!r}")
        rest = rest.strip()
        if rest.startswith('"""'):
            body = rest[3:]
            while '"""' not in body:
                if i >= len(lines):
                    raise ModelfileError(f"line {i}: unterminated \"\"\" string")
                body += "\n" + lines[i]
                i += 1
            rest = body[: body.index('"""')]
        elif len(rest) >= 2 and rest[0] == rest[-1] == '"':
            rest = rest[1:-1]
        if cmd == "from":
            mf.from_ = rest
        elif cmd == "parameter":
            m = re.match(r"(\S+)\s+(.*)$", rest, re.S)
            if not m:
                raise ModelfileError(f"line {i}: PARAMETER needs a name and a value")
            key, value = m.group(1), _value(m.group(2).strip())
            if key == "stop":
                mf.parameters.setdefault("stop", []).append(value if isinstance(value, str) else str(value))
            else:
                mf.parameters[key] = value
        elif cmd == "template":
            mf.template = rest
        elif cmd == "system":
            mf.system = rest
        elif cmd == "license":
            mf.license.append(rest)
        elif cmd == "adapter":
            mf.adapters.append(rest)
        elif cmd == "message":
            role, _, content = rest.partition(" ")
            if role not in ("system", "user", "assistant"):
                raise ModelfileError(f"line {i}: MESSAGE role must be system, user or assistant")
            mf.messages.append({"role": role, "content": content})
    if not mf.from_:
        raise ModelfileError("no FROM line")
    return mf

