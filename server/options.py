"""Ollama ``options`` (also Modelfile parameters): checking and mapping to the engine.

Type errors and impossible values are refused with a 400 naming the option; unknown
keys are ignored with a warning in the log, as Ollama does (LangChain sends
``tfs_z`` and ``mirostat``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from backends.base import SamplingParams
from server.errors import BadRequest

log = logging.getLogger("kiln.options")

_INT, _FLOAT, _BOOL, _STRS = "integer", "number", "boolean", "list of strings"

# name -> (type, minimum, maximum); None = unbounded on that side.
RUNTIME: dict[str, tuple[str, float | None, float | None]] = {
    "num_predict": (_INT, -2, 1 << 31),
    "temperature": (_FLOAT, 0.0, 100.0),
    "top_k": (_INT, 0, 1 << 31),
    "top_p": (_FLOAT, 0.0, 1.0),
    "min_p": (_FLOAT, 0.0, 1.0),
    "typical_p": (_FLOAT, 0.0, 1.0),
    "repeat_penalty": (_FLOAT, 0.0, 100.0),
    "repeat_last_n": (_INT, -1, 1 << 31),
    "presence_penalty": (_FLOAT, -100.0, 100.0),
    "frequency_penalty": (_FLOAT, -100.0, 100.0),
    "seed": (_INT, -(1 << 63), (1 << 63) - 1),
    "stop": (_STRS, None, None),
    "num_keep": (_INT, -1, 1 << 31),
}
LOAD: dict[str, tuple[str, float | None, float | None]] = {
    "num_ctx": (_INT, 1, 1 << 24),
    "num_batch": (_INT, 1, 1 << 16),
    "num_thread": (_INT, 0, 1024),
    "num_gpu": (_INT, -1, 1 << 16),
    "main_gpu": (_INT, 0, 1 << 16),
    "use_mmap": (_BOOL, None, None),
    "use_mlock": (_BOOL, None, None),
    "numa": (_BOOL, None, None),
    "low_vram": (_BOOL, None, None),
    "f16_kv": (_BOOL, None, None),
    "vocab_only": (_BOOL, None, None),
    "logits_all": (_BOOL, None, None),
    "penalize_newline": (_BOOL, None, None),
}
# Accepted for compatibility, with no effect on this server (the log says so).
IGNORED = {"num_gpu", "main_gpu", "use_mmap", "use_mlock", "numa", "low_vram", "f16_kv", "vocab_only",
           "logits_all", "penalize_newline", "num_keep", "tfs_z", "mirostat", "mirostat_tau",
           "mirostat_eta", "num_gqa"}


def check(options: Any, *, where: str = "options") -> dict[str, Any]:
    """Validates an options object; returns it with known keys only."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise BadRequest(f"{where} must be an object")
    out: dict[str, Any] = {}
    for key, value in options.items():
        spec = RUNTIME.get(key) or LOAD.get(key)
        if spec is None:
            if key not in IGNORED:
                log.warning("invalid option provided: %s (ignored)", key)
            continue
        if value is None:
            continue
        kind, lo, hi = spec
        out[key] = _coerce(key, value, kind, lo, hi)
        if key in IGNORED:
            log.info("option %s has no effect on this server (ignored)", key)
    return out


def _coerce(key: str, value: Any, kind: str, lo: float | None, hi: float | None) -> Any:
    if kind == _BOOL:
        if not isinstance(value, bool):
            raise BadRequest(f'option "{key}" must be a boolean')
        return value
    if kind == _STRS:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise BadRequest(f'option "{key}" must be a list of strings')
        if len(value) > 16 or any(len(s) > 512 for s in value):
            raise BadRequest(f'option "{key}": at most 16 stop strings of up to 512 characters')
        return [s for s in value if s]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f'option "{key}" must be a{"n" if kind == _INT else ""} {kind}, not {type(value).__name__}')
    if isinstance(value, float) and not math.isfinite(value):
        raise BadRequest(f'option "{key}" must be a finite number')
    if kind == _INT:
        if isinstance(value, float):
            if not value.is_integer():
                raise BadRequest(f'option "{key}" must be an integer')
            value = int(value)
    else:
        value = float(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise BadRequest(f'option "{key}" is {value}; it must be between {_fmt(lo)} and {_fmt(hi)}')
    return value


def _fmt(v: float | None) -> str:
    return "-inf" if v is None else (str(int(v)) if float(v).is_integer() else str(v))


@dataclass
class Resolved:
    sampling: SamplingParams
    num_ctx: int | None  # requested context, None = the model's default


def resolve(defaults: dict[str, Any], options: dict[str, Any]) -> Resolved:
    """Merges the model's default parameters with the request's options."""
    o = {**check(defaults, where="model parameters"), **options}
    s = SamplingParams()
    n = o.get("num_predict")
    s.max_tokens = None if n is None or n < 0 else n
    for name in ("temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty",
                 "repeat_last_n", "presence_penalty", "frequency_penalty"):
        if name in o:
            setattr(s, name, o[name])
    seed = o.get("seed")
    s.seed = None if seed is None or seed < 0 else seed % 0xFFFFFFFF  # 0xFFFFFFFF means "random" to llama.cpp
    s.stop = list(o.get("stop") or [])
    return Resolved(s, o.get("num_ctx"))
