"""A careful GGUF reader: checks a file's header, sizes and offsets before any
native loader sees it, and extracts the metadata the model store needs.

Model files are untrusted input. llama.cpp's own parser has had heap overflows on
crafted headers, so every count and length here is bounded by the file's size and
by fixed limits before anything is allocated.

Metadata arrays (the vocabulary, merges, scores: hundreds of thousands of items) are
walked but not turned into Python objects unless ``full_arrays`` asks for them (``kiln
compile`` builds a tokenizer from them); the model store keeps only short arrays and
the texts of the special tokens it names (BOS, EOS). Before, a 10 MB crafted array
cost the gateway 35 s of CPU and 150 MB.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Any

MAGIC = b"GGUF"
MAX_KV = 1 << 16
MAX_TENSORS = 1 << 20
MAX_STRING = 16 << 20  # 16 MiB: chat templates are a few KiB, token texts bytes
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_NESTING = 2
# The largest vocabularies are ~262k tokens (Gemma 3); merges are about as many.
MAX_ARRAY_ITEMS = 1 << 21
MAX_ARRAY_BYTES = 64 << 20  # the vocabulary of a 262k-token model is ~5 MB
KEEP_ARRAY = 64  # arrays up to this long are kept as lists (per-layer values, ...)

# ggml_type -> (elements per block, bytes per block); gguf-py GGML_QUANT_SIZES.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}

# general.file_type -> the name Ollama shows as quantization_level (llama_ftype).
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
    38: "MXFP4_MOE",
}

# GGUF metadata value types: id -> struct format (None: string/array).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")


class GGUFError(ValueError):
    """The file is not a well-formed GGUF model."""


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type_name: str
    offset: int  # relative to the data section
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class GGUFInfo:
    path: str
    version: int
    size: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo] = field(repr=False)
    tokens: list[str] = field(default_factory=list, repr=False)  # all of them only with full_arrays
    special_tokens: dict[int, str] = field(default_factory=dict, repr=False)  # id -> text of bos, eos, ...

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    def arch_value(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def context_length(self) -> int:
        return int(self.arch_value("context_length", 2048))

    @property
    def embedding_length(self) -> int:
        return int(self.arch_value("embedding_length", 0))

    @property
    def chat_template(self) -> str | None:
        t = self.metadata.get("tokenizer.chat_template")
        return t if isinstance(t, str) and t.strip() else None

    @property
    def parameter_count(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def quantization(self) -> str:
        ft = self.metadata.get("general.file_type")
        if isinstance(ft, int) and ft in FILE_TYPES:
            return FILE_TYPES[ft]
        # No file type recorded: name the most common tensor type.
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.type_name] = counts.get(t.type_name, 0) + t.nbytes
        return max(counts, key=counts.__getitem__) if counts else "unknown"

    def token_text(self, key: str) -> str | None:
        """The text of a special token, e.g. ``token_text("bos")``."""
        tid = self.metadata.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(tid, int) and 0 <= tid < len(self.tokens):
            return self.tokens[tid]
        return self.special_tokens.get(tid) if isinstance(tid, int) else None

    def model_info(self) -> dict[str, Any]:
        """Metadata as Ollama's /api/show ``model_info``: big arrays are left out
        (null), as Ollama does unless ``verbose`` is set."""
        info: dict[str, Any] = {}
        for k, v in self.metadata.items():
            if k == "tokenizer.chat_template":
                continue
            info[k] = None if isinstance(v, (_LongArray, SkippedArray)) else v
        info["general.parameter_count"] = self.parameter_count
        return info


class _LongArray(list):
    """An array too long to show in ``model_info``, read in full (``full_arrays``)."""


@dataclass(frozen=True)
class SkippedArray:
    """An array walked over but not read: its element type, length and where its
    elements start in the file."""

    etype: int
    count: int
    offset: int


class _Reader:
    """Reads from a memory map: walking a long array is ``unpack_from`` per element,
    with no read call or copy (a 262k-token vocabulary takes ~0.1 s)."""

    def __init__(self, buf: Any, size: int) -> None:
        self.buf, self.size, self.pos = buf, size, 0

    def tell(self) -> int:
        return self.pos

    def read(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(f"truncated file: {n} bytes wanted at offset {self.pos}")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise GGUFError(f"truncated file: {n} bytes wanted at offset {self.pos}")
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > MAX_STRING:
            raise GGUFError(f"string of {n} bytes at offset {self.pos} is over the limit")
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int, depth: int = 0, keep: int = 1 << 30) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            if depth >= MAX_ARRAY_NESTING:
                raise GGUFError("arrays nested too deeply")
            etype = self.unpack("<I")
            n = self.unpack("<Q")
            # Every element takes at least one byte: a count beyond the bytes left is a lie.
            if n > self.size - self.pos:
                raise GGUFError(f"array of {n} elements cannot fit in the file")
            if n > MAX_ARRAY_ITEMS:
                raise GGUFError(f"array of {n} elements is over the limit of {MAX_ARRAY_ITEMS}")
            start = self.pos
            if n > keep:  # walked, bounded, and left in the file
                self.skip(etype, n, depth + 1)
                if self.pos - start > MAX_ARRAY_BYTES:
                    raise GGUFError(f"array of {self.pos - start} bytes at offset {start} is over the limit "
                                    f"of {MAX_ARRAY_BYTES}")
                return SkippedArray(etype, n, start)
            return [self.value(etype, depth + 1) for _ in range(n)]
        raise GGUFError(f"unknown metadata value type {vtype}")

    def skip(self, etype: int, n: int, depth: int) -> None:
        """Moves past ``n`` elements of type ``etype`` without making objects of them."""
        if etype in _SCALARS:
            self._advance(n * struct.calcsize(_SCALARS[etype]))
        elif etype == _STRING:
            buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
            for _ in range(n):
                if pos + 8 > size:
                    raise GGUFError(f"truncated file: 8 bytes wanted at offset {pos}")
                (length,) = unpack(buf, pos)
                if length > MAX_STRING:
                    raise GGUFError(f"string of {length} bytes at offset {pos} is over the limit")
                pos += 8 + length
            self.pos = pos
            self._advance(0)
        elif etype == _ARRAY:
            if depth >= MAX_ARRAY_NESTING:
                raise GGUFError("arrays nested too deeply")
            for _ in range(n):
                inner, count = self.unpack("<I"), self.unpack("<Q")
                if count > self.size - self.pos:
                    raise GGUFError(f"array of {count} elements cannot fit in the file")
                self.skip(inner, count, depth + 1)
        else:
            raise GGUFError(f"unknown metadata value type {etype}")

    def _advance(self, n: int) -> None:
        if self.pos + n > self.size:
            raise GGUFError(f"truncated file: {n} bytes wanted at offset {self.pos}")
        self.pos += n

    def strings_at(self, arr: SkippedArray, wanted: set[int]) -> dict[int, str]:
        """The texts of elements ``wanted`` of a skipped string array."""
        out: dict[int, str] = {}
        if arr.etype != _STRING or not wanted:
            return out
        last, pos = max(wanted), arr.offset
        for i in range(min(last + 1, arr.count)):
            length = struct.unpack_from("<Q", self.buf, pos)[0]  # bounds checked by skip()
            if i in wanted:
                out[i] = bytes(self.buf[pos + 8:pos + 8 + length]).decode("utf-8", errors="replace")
            pos += 8 + length
        return out


def read_gguf(path: str | os.PathLike[str], *, full_arrays: bool = False,
              token_ids: tuple[int, ...] = ()) -> GGUFInfo:
    """Parse and validate a GGUF file's header. Raises ``GGUFError`` on anything
    malformed: bad magic or version, counts or strings beyond limits, unknown tensor
    types, tensors whose data would lie outside the file or overlap. Arrays longer
    than ``KEEP_ARRAY`` are ``SkippedArray``s unless ``full_arrays``; of the vocabulary
    only the special tokens' texts are read, and those of ``token_ids``."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        f = open(path, "rb")
    except OSError as e:
        raise GGUFError(f"cannot open {os.path.basename(path)}: {e.strerror}") from e
    with f:
        if size < 24:
            raise GGUFError(f"{os.path.basename(path)} is not a GGUF file (only {size} bytes)")
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise GGUFError(f"cannot map {os.path.basename(path)}: {e}") from e
        try:
            return _parse(path, size, _Reader(buf, size), full_arrays, token_ids)
        finally:
            buf.close()


def _parse(path: str, size: int, r: _Reader, full_arrays: bool, token_ids: tuple[int, ...] = ()) -> GGUFInfo:
    if r.read(4) != MAGIC:
        raise GGUFError(f"{os.path.basename(path)} is not a GGUF file (bad magic)")
    version = r.unpack("<I")
    if version not in (2, 3):
        raise GGUFError(f"unsupported GGUF version {version}")
    n_tensors, n_kv = r.unpack("<Q"), r.unpack("<Q")
    if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
        raise GGUFError(f"implausible header: {n_tensors} tensors, {n_kv} metadata keys")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = r.string()
        vtype = r.unpack("<I")
        val = r.value(vtype, keep=MAX_ARRAY_ITEMS if full_arrays else KEEP_ARRAY)
        if full_arrays and isinstance(val, list) and len(val) > KEEP_ARRAY:
            val = _LongArray(val)
        if key in metadata:
            raise GGUFError(f"duplicate metadata key {key!r}")
        metadata[key] = val
    vocab = metadata.get("tokenizer.ggml.tokens")
    tokens = [str(t) for t in vocab] if isinstance(vocab, list) else []
    special: dict[int, str] = {}
    if isinstance(vocab, SkippedArray):  # only the special tokens the manifest names
        wanted = {v for k, v in metadata.items() if k.startswith("tokenizer.ggml.") and k.endswith("_token_id")
                  and isinstance(v, int) and 0 <= v < vocab.count}
        wanted |= {i for i in token_ids if 0 <= i < vocab.count}
        special = r.strings_at(vocab, wanted)
    tensors = []
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.unpack("<I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(f"tensor {name!r} has {n_dims} dimensions")
        shape = tuple(r.unpack("<Q") for _ in range(n_dims))
        ttype = r.unpack("<I")
        offset = r.unpack("<Q")
        if ttype not in GGML_TYPES:
            raise GGUFError(f"tensor {name!r} has unknown type {ttype}")
        tname, block, bsize = GGML_TYPES[ttype]
        n = 1
        for d in shape:
            if d <= 0 or d > size * 256:
                raise GGUFError(f"tensor {name!r} has an invalid dimension {d}")
            n *= d
        if shape[0] % block:
            raise GGUFError(f"tensor {name!r}: row of {shape[0]} is not a multiple of {block}")
        tensors.append(TensorInfo(name, shape, tname, offset, n // block * bsize))
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"invalid general.alignment {alignment!r}")
    data_start = -(-r.tell() // alignment) * alignment
    data_size = size - data_start
    end = 0
    for t in sorted(tensors, key=lambda t: t.offset):
        if t.offset % alignment:
            raise GGUFError(f"tensor {t.name!r} is not aligned to {alignment}")
        if t.offset < end:
            raise GGUFError(f"tensor {t.name!r} overlaps the tensor before it")
        end = t.offset + t.nbytes
        if end > data_size:
            raise GGUFError(f"tensor {t.name!r} ends beyond the end of the file")
    if "general.architecture" not in metadata:
        raise GGUFError("general.architecture is missing")
    return GGUFInfo(path, version, size, metadata, tensors, tokens, special)


def human_number(n: int) -> str:
    """Parameter counts as Ollama prints them (format.HumanNumber): 8.0B, 134.52M."""
    for unit, scale, fmt in (("B", 1e9, "%.1f"), ("M", 1e6, "%.2f"), ("K", 1e3, "%.0f")):
        if n >= scale:
            v = n / scale
            return ("%.0f" % v if v == int(v) else fmt % v) + unit
    return str(n)
