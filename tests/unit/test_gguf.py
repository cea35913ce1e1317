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
    from backends.bundled import smollm2_path

    path = smollm2_path()
    if path is None:
        pytest.skip("bundled model not installed")
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
