"""The GGUF reader refuses malformed headers before any native loader sees them."""

import struct

import pytest

from backends.gguf import GGUFError, human_number, read_gguf


def _kv_string(key: str, value: str) -> bytes:
    k, v = key.encode(), value.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", 8) + struct.pack("<Q", len(v)) + v


def _header(n_tensors: int = 0, kvs: bytes = b"", n_kv: int = 0, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + kvs


def _tensor(name: str, dims: tuple[int, ...], ttype: int, offset: int) -> bytes:
    n = name.encode()
    return (struct.pack("<Q", len(n)) + n + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
            + struct.pack("<IQ", ttype, offset))


def _write(tmp_path, data: bytes):
    p = tmp_path / "m.gguf"
    p.write_bytes(data)
    return p


ARCH = _kv_string("general.architecture", "llama")


def test_minimal_valid(tmp_path):
    body = _header(1, ARCH + b"", 1) + _tensor("w", (32,), 0, 0)
    body += b"\0" * (-len(body) % 32) + b"\0" * 128
    info = read_gguf(_write(tmp_path, body))
    assert info.architecture == "llama" and info.parameter_count == 32


@pytest.mark.parametrize("data, message", [
    (b"GGML" + b"\0" * 20, "bad magic"),
    (_header(version=7), "version"),
    (_header(n_tensors=1 << 40), "implausible"),
    (_header(n_kv=1, kvs=struct.pack("<Q", 1 << 40)), "over the limit"),
    (_header(n_kv=1, kvs=struct.pack("<Q", 1 << 20) + b"key"), "truncated"),
    (_header(n_kv=1, kvs=struct.pack("<Q", 3) + b"key" + struct.pack("<I", 99)), "unknown metadata value type"),
    (_header(n_kv=1, kvs=struct.pack("<Q", 3) + b"key" + struct.pack("<IIQ", 9, 4, 1 << 50)), "cannot fit"),
    (_header(1, ARCH, 1) + _tensor("w", (32,), 0, 1 << 40), "beyond the end"),
    (_header(1, ARCH, 1) + _tensor("w", (32,), 77, 0), "unknown type"),
    (_header(1, ARCH, 1) + _tensor("w", (33,), 2, 0), "multiple of"),
    (_header(1, ARCH, 1) + _tensor("w", (0,), 0, 0), "invalid dimension"),
    (_header(1, ARCH, 1) + struct.pack("<Q", 1) + b"w" + struct.pack("<I", 9), "dimensions"),
    (_header(2, ARCH, 1) + _tensor("a", (32,), 0, 0) + _tensor("b", (32,), 0, 64), "overlaps"),
    (_header(0, b"", 0), "architecture is missing"),
])
def test_rejects(tmp_path, data, message):
    data += b"\0" * 256
    with pytest.raises(GGUFError, match=message):
        read_gguf(_write(tmp_path, data))


def test_bundled_model_metadata():
    from tests.models import bundled_gguf

    path = bundled_gguf()
    info = read_gguf(path)
    assert info.architecture == "llama"
    assert info.context_length == 8192
    assert info.quantization == "Q4_1"
    assert "<|im_start|>" in info.chat_template
    assert info.token_text("eos") == "<|im_end|>"


@pytest.mark.parametrize("n, s", [(134_515_008, "134.52M"), (8_000_000_000, "8B"), (7_615_616_512, "7.6B"),
                                  (5_000, "5K"), (12, "12")])
def test_human_number(n, s):
    assert human_number(n) == s


# -- metadata arrays: bounded before they become Python objects ---------------------------

def _kv_array(key: str, etype: int, items: list[bytes]) -> bytes:
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<IIQ", 9, etype, len(items)) + b"".join(items)


def _s(text: str) -> bytes:
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


def _kv_u32(key: str, value: int) -> bytes:
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<II", 4, value)


def _model(kvs: list[bytes]) -> bytes:
    body = _header(1, b"".join([ARCH, *kvs]), 1 + len(kvs)) + _tensor("w", (32,), 0, 0)
    return body + b"\0" * (-len(body) % 32) + b"\0" * 128


def test_long_arrays_are_skipped_keeping_the_special_tokens(tmp_path):
    from backends.gguf import SkippedArray

    vocab = [_s(f"tok{i}") for i in range(5000)]
    vocab[3], vocab[4000] = _s("<s>"), _s("</s>")
    path = _write(tmp_path, _model([_kv_array("tokenizer.ggml.tokens", 8, vocab),
                                    _kv_array("tokenizer.ggml.scores", 6, [struct.pack("<f", 0.5)] * 5000),
                                    _kv_array("llama.short", 4, [struct.pack("<I", 7)] * 3),
                                    _kv_u32("tokenizer.ggml.bos_token_id", 3),
                                    _kv_u32("tokenizer.ggml.eos_token_id", 4000)]))
    info = read_gguf(path)
    assert isinstance(info.metadata["tokenizer.ggml.tokens"], SkippedArray)
    assert info.metadata["tokenizer.ggml.tokens"].count == 5000
    assert info.metadata["llama.short"] == [7, 7, 7]  # short arrays are kept
    assert (info.token_text("bos"), info.token_text("eos")) == ("<s>", "</s>")
    assert info.tokens == []
    shown = info.model_info()
    assert shown["tokenizer.ggml.tokens"] is None and shown["tokenizer.ggml.scores"] is None
    full = read_gguf(path, full_arrays=True)  # kiln compile builds a tokenizer from them
    assert len(full.tokens) == 5000 and full.tokens[4000] == "</s>"
    assert full.token_text("eos") == "</s>" and full.model_info() == shown


def test_a_ten_megabyte_array_costs_little(tmp_path):
    """A crafted 10 MB array used to become millions of Python objects: 35 s, +150 MB."""
    import time
    import tracemalloc

    n = 1_250_000  # 10 MB of empty strings (8-byte lengths), under the item limit
    path = _write(tmp_path, _model([_kv_array("x.blob", 8, [struct.pack("<Q", 0)] * n)]))
    t0 = time.monotonic()
    info = read_gguf(path)
    took = time.monotonic() - t0
    assert info.metadata["x.blob"].count == n
    assert took < 5, took  # ~0.5 s on a busy 2-core machine
    small = tmp_path / "small"
    small.mkdir()
    path = _write(small, _model([_kv_array("x.blob", 8, [struct.pack("<Q", 0)] * 100_000)]))
    tracemalloc.start()  # slows each allocation: measured on a smaller array
    read_gguf(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 << 20, peak  # no object per element


@pytest.mark.parametrize("kv, message", [
    (_kv_array("x", 0, [b"\0"] * 3_000_000), "over the limit of"),  # items
    (_kv_array("x", 8, [struct.pack("<Q", 1 << 20) + b"a" * (1 << 20)] * 70), "bytes at offset"),  # bytes
    (_kv_array("x", 8, [struct.pack("<Q", 1 << 40)] * 100), "over the limit"),  # one string
    (_kv_array("x", 8, [struct.pack("<Q", 1 << 20)] * 100), "truncated"),
    (_kv_array("x", 9, [struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 0, 0)] * 100), "nested too deeply"),
])
def test_arrays_beyond_the_limits_are_refused(tmp_path, kv, message):
    with pytest.raises(GGUFError, match=message):
        read_gguf(_write(tmp_path, _model([kv])))
