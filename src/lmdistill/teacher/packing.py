"""Token ids packed as tightly as the vocabulary allows: ceil(log2 V) bits each (18 bits at V = 151,936).

The bit stream is little-endian: value j occupies bits [j*b, (j+1)*b) of the stream, bit i of the stream is bit
(i % 8) of byte i // 8. Work goes in chunks of values so the [chunk, b] bit matrix stays small.
"""

from __future__ import annotations

import torch
from torch import Tensor

_CHUNK_VALUES = 1 << 18  # a multiple of 8, so every chunk starts on a byte boundary for any bit width
_BYTE_WEIGHTS = torch.tensor([1 << i for i in range(8)], dtype=torch.int32)


def id_bits(vocab_size: int) -> int:
    """Bits needed for ids 0 .. vocab_size - 1."""
    return max(1, (vocab_size - 1).bit_length())


def packed_bytes(n_values: int, bits: int) -> int:
    return (n_values * bits + 7) // 8


def pack_ids(ids: Tensor, bits: int) -> Tensor:
    """ids [...] integers in [0, 2**bits) -> uint8 [packed_bytes(ids.numel(), bits)]."""
    flat = ids.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"ids must lie in [0, {1 << bits}) to pack in {bits} bits")
    shifts = torch.arange(bits, dtype=torch.int64)
    out = []
    for part in torch.split(flat, _CHUNK_VALUES):
        stream = ((part[:, None] >> shifts) & 1).to(torch.int32).reshape(-1)  # [n * bits]
        stream = torch.cat([stream, stream.new_zeros((-stream.numel()) % 8)])
        out.append((stream.reshape(-1, 8) * _BYTE_WEIGHTS).sum(1).to(torch.uint8))  # [n * bits / 8]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.uint8)


def unpack_ids(packed: Tensor, bits: int, n_values: int) -> Tensor:
    """uint8 [packed_bytes(n_values, bits)] -> int64 [n_values]."""
    if packed.numel() != packed_bytes(n_values, bits):
        raise ValueError(f"{packed.numel()} packed bytes cannot hold {n_values} ids of {bits} bits")
    weights = torch.tensor([1 << i for i in range(bits)], dtype=torch.int64)
    out = []
    for start in range(0, n_values, _CHUNK_VALUES):
        count = min(_CHUNK_VALUES, n_values - start)
        part = packed[start * bits // 8: start * bits // 8 + packed_bytes(count, bits)]
        stream = ((part.to(torch.int64)[:, None] >> torch.arange(8)) & 1).reshape(-1)[: count * bits]  # [count*bits]
        out.append((stream.reshape(count, bits) * weights).sum(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)
