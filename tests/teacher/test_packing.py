"""Bit packing of token ids against a plain per-value reference."""

import pytest
import torch

from lmdistill.teacher.packing import id_bits, pack_ids, packed_bytes, unpack_ids


def _reference_pack(values: list[int], bits: int) -> bytes:
    stream = 0
    for j, v in enumerate(values):
        stream |= v << (j * bits)
    return stream.to_bytes(packed_bytes(len(values), bits), "little")


@pytest.mark.parametrize("vocab", [2, 3, 1000, 1024, 1025, 32000, 151936])
def test_pack_roundtrip_and_reference(vocab):
    gen = torch.Generator().manual_seed(vocab)
    ids = torch.randint(0, vocab, (37, 5), generator=gen)
    bits = id_bits(vocab)
    assert 2 ** (bits - 1) < vocab <= 2 ** bits or vocab == 2
    packed = pack_ids(ids, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_bytes(ids.numel(), bits)
    assert bytes(packed.tolist()) == _reference_pack(ids.reshape(-1).tolist(), bits)
    assert torch.equal(unpack_ids(packed, bits, ids.numel()).reshape(37, 5), ids)


def test_bits_at_qwen_vocab_and_bounds():
    assert id_bits(151936) == 18
    with pytest.raises(ValueError):
        pack_ids(torch.tensor([1024]), 10)
    with pytest.raises(ValueError):
        unpack_ids(torch.zeros(3, dtype=torch.uint8), 10, 7)
