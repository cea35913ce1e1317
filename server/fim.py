"""Fill-in-the-middle (``suffix``) for models whose template does not read ``suffix``:
the model's own FIM tokens, named in its GGUF (``tokenizer.ggml.fim_pre_token_id`` ...)."""

from __future__ import annotations

import functools

from backends.gguf import read_gguf
from backends.store import Manifest, ModelStore
from server.errors import BadRequest

# GGUF keys of the fill-in-the-middle tokens (llama.cpp's names, and the older ones).
_FIM_KEYS = (("fim_pre", "prefix"), ("fim_suf", "suffix"), ("fim_mid", "middle"))


def fim_ids(m: Manifest) -> list[int] | None:
    ids = []
    for new, old in _FIM_KEYS:
        tid = m.model_info.get(f"tokenizer.ggml.{new}_token_id", m.model_info.get(f"tokenizer.ggml.{old}_token_id"))
        if not isinstance(tid, int) or isinstance(tid, bool) or tid < 0:
            return None
        ids.append(tid)
    return ids


@functools.lru_cache(maxsize=8)
def _gguf_tokens(path: str, ids: tuple[int, ...]) -> tuple[str, ...]:
    info = read_gguf(path, token_ids=ids)
    return tuple(info.tokens[i] if i < len(info.tokens) else info.special_tokens.get(i, "") for i in ids)


def fim_tokens(m: Manifest, store: ModelStore) -> tuple[str, str, str]:
    """The texts of the model's FIM prefix, suffix and middle tokens, from its GGUF
    (the tokenizer reads them back as the special tokens)."""
    ids = fim_ids(m)
    if ids is None or m.format != "gguf" or not m.files:
        raise BadRequest(f'"{m.name}" does not support insert')
    pre, suf, mid = _gguf_tokens(str(store.resolve(m.files[0])), tuple(ids))
    if not (pre and suf and mid):
        raise BadRequest(f'"{m.name}" does not support insert (its FIM tokens have no text)')
    return pre, suf, mid
