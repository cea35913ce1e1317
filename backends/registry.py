"""Which engines exist: the built-ins, and third-party ones from the ``kiln.backends``
entry-point group (``name = "module:Class"``; the module must be importable in a worker,
which looks the engine up here by the model's backend name).

Engines are named by import path and imported only when a model needs them, so the
gateway starts without loading OpenVINO or llama.cpp.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from backends.base import Engine

BUILTIN: dict[str, str] = {
    "llamacpp": "backends.llamacpp:LlamaCppEngine",
    "openvino": "backends.openvino:OpenVINOEngine",
    "fake": "backends.fake:FakeEngine",
}

_registry: dict[str, str] = dict(BUILTIN)


def target(name: str) -> str:
    _load_entry_points()
    try:
        return _registry[name]
    except KeyError:
        raise KeyError(f"unknown backend {name!r} (known: {', '.join(sorted(_registry))})") from None


def engine_class(name: str) -> type[Engine]:
    module, _, cls = target(name).partition(":")
    return getattr(importlib.import_module(module), cls)


_loaded = False


def _load_entry_points() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for ep in entry_points(group="kiln.backends"):
        _registry.setdefault(ep.name, ep.value)
