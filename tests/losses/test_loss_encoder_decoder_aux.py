"""Encoder-decoder attention and contrastive modules on random tensors, against plain float64 references:
key masks, differing head and layer counts per side, the sides knob and its errors."""

from __future__ import annotations

import pytest
import torch

from lmdistill.losses import LossConfigError, attention_loss
from lmdistill.losses.attention import EncoderDecoderAttentionDistiller
from lmdistill.losses.contrastive import ContrastiveDistiller, EncoderDecoderContrastiveDistiller

B, S, T = 3, 7, 5  # batch, source length, target length


def _maps(g, layers, heads, queries, keys, key_mask) -> tuple[torch.Tensor, ...]:
    """Random attention maps [B, H, queries, keys] whose masked keys get no probability, as a model gives them."""
    scores = torch.randn(layers, B, heads, queries, keys, generator=g)
    scores = scores.masked_fill(~key_mask.bool()[None, :, None, None, :], float("-inf"))
    return tuple(torch.softmax(scores, -1))


def _kl(student, teacher, rows, keys) -> torch.Tensor:
    """Plain float64 KL(teacher || student) over unmasked keys, mean over heads and counted rows. [B, H, Q, K]."""
    s, t = student.double(), teacher.double()
    terms = torch.where(t > 0, t * (t.log() - s.clamp_min(1e-300).log()), torch.zeros_like(t))
    per_row = (terms * keys.double()[:, None, None, :]).sum(-1)  # [B, H, Q]
    return per_row[rows.bool()[:, None, :].expand_as(per_row)].mean()


@pytest.fixture
def masks():
    enc = torch.ones(B, S, dtype=torch.long)
    enc[1, 4:] = 0
    enc[2, 6:] = 0
    dec = torch.ones(B, T, dtype=torch.long)
    dec[0, 3:] = 0
    return enc, dec


def test_key_mask_keeps_masked_keys_out_and_changes_nothing_for_model_maps():
    g = torch.Generator().manual_seed(0)
    keys = torch.tensor([[1] * S, [1] * 4 + [0] * 3, [1] * S])
    rows = torch.tensor([[1] * T, [1] * T, [1] * 2 + [0] * 3])
    (a_s,), (a_t,) = _maps(g, 1, 2, T, S, keys), _maps(g, 1, 2, T, S, keys)
    plain = attention_loss([a_s], [a_t], rows)
    torch.testing.assert_close(attention_loss([a_s], [a_t], rows, key_mask=keys), plain)  # models zero them anyway
    torch.testing.assert_close(plain.double(), _kl(a_s, a_t, rows, keys), rtol=1e-5, atol=1e-7)
    spoiled_t = a_t.masked_fill(~keys.bool()[:, None, None, :], 0.3)
    torch.testing.assert_close(attention_loss([a_s], [spoiled_t], rows, key_mask=keys), plain)
    assert not torch.allclose(attention_loss([a_s], [spoiled_t], rows), plain)


def test_attention_sides_with_own_layer_maps_and_grouped_heads(masks):
    enc, dec = masks
    g = torch.Generator().manual_seed(1)
    # Student: 1 encoder / 2 decoder layers, 2 heads; teacher: 3 encoder / 4 decoder layers, 4 heads.
    student = {"encoder": _maps(g, 1, 2, S, S, enc), "decoder": _maps(g, 2, 2, T, T, dec),
               "cross": _maps(g, 2, 2, T, S, enc)}
    teacher = {"encoder": _maps(g, 3, 4, S, S, enc), "decoder": _maps(g, 4, 4, T, T, dec),
               "cross": _maps(g, 4, 4, T, S, enc)}
    pairs = {"encoder": [(0, 2)], "decoder": [(0, 1), (1, 3)], "cross": [(0, 1), (1, 3)]}
    masks_of = {"encoder": (enc, enc), "decoder": (dec, dec), "cross": (dec, enc)}

    def grouped(t):  # teacher heads (0, 1) -> 0, (2, 3) -> 1
        return t.reshape(B, 2, 2, *t.shape[-2:]).mean(2)

    refs = {side: torch.stack([_kl(student[side][s], grouped(teacher[side][t]), *masks_of[side])
                               for s, t in pairs[side]]).mean() for side in pairs}
    distiller = EncoderDecoderAttentionDistiller((1, 2), (3, 4))
    assert {side: d.layer_map for side, d in distiller.per_side.items()} == pairs
    got = distiller(student["encoder"], teacher["encoder"], enc, student["decoder"], teacher["decoder"], dec,
                    student["cross"], teacher["cross"])
    torch.testing.assert_close(got.double(), sum(refs.values()) / 3, rtol=1e-5, atol=1e-7)
    decoder_only = EncoderDecoderAttentionDistiller((1, 2), (3, 4), sides=["decoder"])
    torch.testing.assert_close(decoder_only(None, None, enc, student["decoder"], teacher["decoder"], dec).double(),
                               refs["decoder"], rtol=1e-5, atol=1e-7)
    with pytest.raises(LossConfigError, match=r"attention loss, encoder attentions: layers\[0\] = \[0, 3\]: student "
                                              r"layers are 0..0 and teacher layers 0..2"):
        EncoderDecoderAttentionDistiller((1, 2), (3, 4), layers=[[0, 3]])


def test_contrastive_sides_each_with_own_projections(masks):
    enc, dec = masks
    g = torch.Generator().manual_seed(2)
    states = [torch.randn(B, n, d, generator=g) for n, d in ((S, 16), (S, 32), (T, 16), (T, 32))]
    torch.manual_seed(0)
    both = EncoderDecoderContrastiveDistiller(16, 32, proj_dim=8, temperature=0.2)
    encoder, decoder = both.per_side["encoder"], both.per_side["decoder"]
    assert isinstance(encoder, ContrastiveDistiller) and encoder.student_proj is not decoder.student_proj
    got = both(states[0], states[1], enc, states[2], states[3], dec)
    labels = dec.sum(1)  # both sides weigh an example by its counted labels
    torch.testing.assert_close(got, 0.5 * (encoder(states[0], states[1], enc, weights=labels)
                                           + decoder(states[2], states[3], dec)))
    only = EncoderDecoderContrastiveDistiller(16, 32, sides=["encoder"])
    assert list(only.per_side) == ["encoder"]
    torch.testing.assert_close(only(states[0], states[1], enc, None, None, dec),
                               only.per_side["encoder"](states[0], states[1], enc, weights=labels))


@pytest.mark.parametrize("sides, message", [
    ([], r"sides must be a non-empty list drawn from \['encoder', 'decoder'\], got \[\]"),
    ("encoder", r"sides must be a non-empty list"),
    (["decoder", "cross"], r"unknown side\(s\) \['cross'\]; choose from \['encoder', 'decoder'\]"),
    (["encoder", "encoder"], r"sides \['encoder', 'encoder'\] repeat a side; list each once"),
])
def test_bad_sides_are_config_errors(sides, message):
    with pytest.raises(LossConfigError, match="contrastive loss: " + message):
        EncoderDecoderContrastiveDistiller(16, 32, sides=sides)
