"""The on-disk format: packed code layout round trips, safetensors header checks, version checks."""

from __future__ import annotations

import json

import pytest
import torch

from ttq.checkpoint.format import (
    FORMAT_VERSION,
    check_version,
    pack_codes,
    read_header,
    read_quantization_config,
    unpack_codes,
)
from ttq.errors import DataNotFoundError, ModelError


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(4, 32), (3, 7), (1, 1), (5, 576)])
def test_pack_round_trip(bits, shape):
    codes = torch.randint(0, 1 << bits, shape, generator=torch.Generator().manual_seed(bits)).to(torch.uint8)
    packed = pack_codes(codes, bits)
    n = codes.numel()
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == (n if bits == 8 else -(-n // 8) * bits)  # bits/8 bytes per code, padded to 8 codes
    assert torch.equal(unpack_codes(packed, bits, shape), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 7])
def test_pack_in_chunks_is_the_same(monkeypatch, bits):
    import ttq.checkpoint.format as fmt

    codes = torch.randint(0, 1 << bits, (13, 37), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    whole = pack_codes(codes, bits)
    monkeypatch.setattr(fmt, "CHUNK_WORDS", 3)  # 61 words in 21 chunks, the last one short
    assert torch.equal(pack_codes(codes, bits), whole)
    assert torch.equal(unpack_codes(whole, bits, (13, 37)), codes)


def test_pack_layout_is_documented_bitstream():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]], dtype=torch.uint8)
    assert pack_codes(codes, 4).tolist() == [0x21, 0x43, 0x65, 0xF7]  # two per byte, the first in the low nibble
    three = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)  # 8 codes -> 3 bytes, code j at bits 3j..3j+2
    word = sum(c << (3 * j) for j, c in enumerate(three[0].tolist()))
    assert pack_codes(three, 3).tolist() == [word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF]


def test_pack_refuses_codes_that_do_not_fit():
    with pytest.raises(ValueError, match="does not fit in 3 bits"):
        pack_codes(torch.tensor([8], dtype=torch.uint8), 3)
    with pytest.raises(ModelError, match="do not hold 4-bit codes"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, (2, 8))


def test_read_header_refuses_truncated_and_malformed(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file({"a": torch.arange(100, dtype=torch.float32)}, path)
    assert read_header(path)["a"]["shape"] == [100]
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(ModelError, match="truncated"):
        read_header(path)
    path.write_bytes(data[:20])
    with pytest.raises(ModelError, match="truncated"):
        read_header(path)
    path.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(ModelError, match="not a readable safetensors"):
        read_header(path)


def test_check_version():
    check_version({"quant_method": "ttq", "format_version": FORMAT_VERSION})
    with pytest.raises(ModelError, match="upgrade ttq"):
        check_version({"quant_method": "ttq", "format_version": FORMAT_VERSION + 1})
    with pytest.raises(ModelError, match="not a ttq checkpoint"):
        check_version({"quant_method": "gptq"})
    with pytest.raises(ModelError, match="format_version"):
        check_version({"quant_method": "ttq", "format_version": "1"})


def test_read_quantization_config_refuses_other_folders(tmp_path, stories_dir):
    with pytest.raises(DataNotFoundError, match="does not exist"):
        read_quantization_config(tmp_path / "nope")
    with pytest.raises(ModelError, match="no config.json"):
        read_quantization_config(tmp_path)
    with pytest.raises(ModelError, match="not a ttq checkpoint"):
        read_quantization_config(stories_dir)  # an ordinary (unquantized) Hugging Face model
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "ttq", "format_version": 1}}))
    with pytest.raises(ModelError, match="no model.safetensors"):
        read_quantization_config(tmp_path)
