"""Generation policy: per-model defaults and allowed ranges for options, what to do with
a value out of range (clamp or refuse), what to do with a prompt longer than the
context (refuse or drop the oldest turns), and the loop guard's settings.

A model's policy (its manifest's ``policy``) is laid over the server's (the
``[policy]`` table of the config file). Nothing is changed silently: every clamp,
default and dropped turn becomes a note, sent back in the ``X-Kiln-Adjusted`` header
and logged.
"""

from __future__ import annotations

import logging
from dataclasses import fields
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.errors import BadRequest
from server.guard import LoopGuardConfig

log = logging.getLogger("kiln.policy")

GUARDED = ("num_predict", "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "repeat_last_n",
           "presence_penalty", "frequency_penalty", "num_ctx")


class Limit(BaseModel):
    model_config = ConfigDict(extra="forbid")
    default: float | None = None  # used when the request does not set the option
    min: float | None = None
    max: float | None = None


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["clamp", "refuse"] = "clamp"
    context_overflow: Literal["error", "truncate"] = "error"
    limits: dict[str, Limit] = Field(default_factory=dict)
    loop_guard: dict[str, Any] = Field(default_factory=dict)
    # When a request brings tools but no tool_choice. "required-then-auto" forces a call
    # on a new question and lets the model answer once a tool result is in: the agent
    # loop small models need (they rarely choose to call a tool on their own).
    tool_choice: Literal["auto", "required", "required-then-auto"] = "auto"

    def guard_config(self) -> LoopGuardConfig:
        known = {f.name for f in fields(LoopGuardConfig)}
        return LoopGuardConfig(**{k: v for k, v in self.loop_guard.items() if k in known})


def merge(*layers: dict[str, Any] | None) -> Policy:
    """Later layers win, key by key (limits per option, loop guard per setting)."""
    out: dict[str, Any] = {"limits": {}, "loop_guard": {}}
    for layer in layers:
        for key, value in (layer or {}).items():
            if key == "limits":
                for opt, lim in (value or {}).items():
                    out["limits"][opt] = {**out["limits"].get(opt, {}), **lim}
            elif key == "loop_guard":
                out["loop_guard"].update(value or {})
            else:
                out[key] = value
    unknown = set(out["limits"]) - set(GUARDED)
    if unknown:
        raise ValueError(f"policy limits for unknown options: {', '.join(sorted(unknown))}")
    return Policy.model_validate(out)


def apply(policy: Policy, options: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Options with the policy's defaults and ranges applied, and notes saying what changed."""
    out = dict(options)
    notes: list[str] = []
    for name, lim in policy.limits.items():
        if name not in out:
            if lim.default is not None:
                out[name] = _typed(name, lim.default)
                notes.append(f"{name}={out[name]} (model default)")
            continue
        value = out[name]
        if name == "num_predict" and value < 0:  # -1/-2 mean "no limit": the policy max is the limit
            if lim.max is not None:
                out[name] = _typed(name, lim.max)
                notes.append(f"num_predict {value} -> {out[name]} (policy max)")
            continue
        for bound, too in (("min", lambda v, b: v < b), ("max", lambda v, b: v > b)):
            b = getattr(lim, bound)
            if b is None or not too(value, b):
                continue
            if policy.mode == "refuse":
                raise BadRequest(f'option "{name}" is {value}; this model\'s policy allows '
                                 f'{_range(lim)} (refused, not clamped)')
            out[name] = _typed(name, b)
            notes.append(f"{name} {value} -> {out[name]} (policy {bound})")
    for note in notes:
        log.info("policy: %s", note)
    return out, notes


def _typed(name: str, v: float) -> float | int:
    return int(v) if name in ("num_predict", "top_k", "repeat_last_n", "num_ctx") else float(v)


def _range(lim: Limit) -> str:
    lo = "-inf" if lim.min is None else f"{lim.min:g}"
    hi = "inf" if lim.max is None else f"{lim.max:g}"
    return f"{lo}..{hi}"
