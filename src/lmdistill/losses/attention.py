"""Attention distillation: KL(teacher || student) between attention distributions of mapped layers.

Needs the attention probabilities, which only the eager attention implementation returns: load both models
with `attn_implementation="eager"` and call them with `output_attentions=True` (SDPA / flash attention return
None, and the loss says so). Heads are matched by `heads`: `"average"` compares head-averaged maps; `"group"`
averages consecutive groups of heads of the model with more heads down to the other's count (one count must
divide the other); `"auto"` groups when it can and averages otherwise. Query rows of padding are not counted.
Models that apply dropout to attention probabilities (T5's `dropout_rate`, BART's `attention_dropout`) return the
maps after dropout while training: the zeroed entries hit the log floor and inflate the value about tenfold at
p = 0.1 (they carry no gradient). Train with that dropout at 0 when this term matters.

Causal LMs: `AttentionDistiller` over the self-attention of every mapped layer. Encoder-decoder models (T5, BART):
`EncoderDecoderAttentionDistiller` compares encoder self-attention (rows and keys masked by the encoder mask),
decoder self-attention (rows and keys masked by the decoder label mask) and decoder cross-attention (query rows
masked by the decoder mask, keys by the encoder mask), each side with its own layer map, averaged over its sides.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lmdistill.losses.errors import LossConfigError, LossInputError
from lmdistill.losses.layers import layer_outputs, resolve_layer_map
from lmdistill.losses.sides import check_sides

HEAD_MODES = ("auto", "average", "group")
ATTENTION_SIDES = ("encoder", "decoder", "cross")


def match_heads(student: Tensor, teacher: Tensor, heads: str) -> tuple[Tensor, Tensor]:
    """student [B, Hs, T, K], teacher [B, Ht, T, K] -> both [B, H, T, K] with the same H (K = T for
    self-attention, the source length for cross-attention)."""
    hs, ht = student.shape[1], teacher.shape[1]
    divides = hs % ht == 0 or ht % hs == 0
    if heads == "group" and not divides:
        raise LossConfigError(f"attention heads='group' needs one head count to divide the other; student has {hs}, "
                              f"teacher {ht}: use heads='average'")
    if heads == "average" or not divides:
        return student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)
    b, _, q, k = student.shape
    if ht > hs:  # teacher heads h*g .. h*g+g-1 form group h
        teacher = teacher.reshape(b, hs, ht // hs, q, k).mean(2)
    elif hs > ht:
        student = student.reshape(b, ht, hs // ht, q, k).mean(2)
    return student, teacher


def attention_kl(student: Tensor, teacher: Tensor, attention_mask: Tensor | None, heads: str = "auto",
                 key_mask: Tensor | None = None) -> Tensor:
    """Mean KL(teacher || student) over heads and attended query rows of one layer. Maps [B, H, T, K] (K = T for
    self-attention); attention_mask [B, T] marks counted query rows, key_mask [B, K] the keys that enter the sum
    (None: all). The models already give masked keys no probability; key_mask keeps whatever sits there out."""
    if student.shape[-2:] != teacher.shape[-2:] or student.shape[0] != teacher.shape[0]:
        raise LossInputError(f"student attentions {tuple(student.shape)} and teacher attentions "
                             f"{tuple(teacher.shape)} must cover the same batch and tokens")
    student, teacher = match_heads(student.float(), teacher.float(), heads)
    # A zero student probability where the teacher has mass would make KL infinite; the floor keeps it finite.
    log_student = student.clamp_min(torch.finfo(torch.float32).tiny).log()
    per_key = torch.special.xlogy(teacher, teacher) - teacher * log_student  # [B, H, T, K]
    if key_mask is not None:
        per_key = per_key * key_mask.to(per_key.dtype)[:, None, None, :]
    per_row = per_key.sum(-1)  # [B, H, T]
    if attention_mask is None:
        return per_row.mean()
    rows = attention_mask.to(per_row.dtype)[:, None, :].expand_as(per_row)
    return (per_row * rows).sum() / rows.sum().clamp_min(1.0)


def attention_loss(student_attentions: Sequence[Tensor], teacher_attentions: Sequence[Tensor],
                   attention_mask: Tensor | None = None, layers: str | Sequence[Sequence[int]] = "uniform",
                   heads: str = "auto", key_mask: Tensor | None = None) -> Tensor:
    """Attention KD averaged over mapped layer pairs. Inputs are `output_attentions=True` tuples of [B, H, T, K]
    (one per layer, no embeddings entry); attention_mask [B, T] (query rows), key_mask [B, K]. Returns a scalar."""
    if heads not in HEAD_MODES:
        raise LossConfigError(f"attention heads must be one of {HEAD_MODES}, got {heads!r}")
    if not student_attentions or not teacher_attentions or any(
            a is None for a in (*student_attentions, *teacher_attentions)):
        raise LossInputError("attentions are missing: load both models with attn_implementation='eager' and call "
                             "them with output_attentions=True")
    pairs = resolve_layer_map(layers, len(student_attentions), len(teacher_attentions))
    return torch.stack([attention_kl(student_attentions[s], teacher_attentions[t], attention_mask, heads, key_mask)
                        for s, t in pairs]).mean()


class AttentionDistiller(nn.Module):
    """`attention_loss` with its layer map fixed from the models' layer counts (no parameters)."""

    requires = "attentions"

    def __init__(self, student_layers: int, teacher_layers: int, layers: str | Sequence[Sequence[int]] = "uniform",
                 heads: str = "auto") -> None:
        super().__init__()
        if heads not in HEAD_MODES:
            raise LossConfigError(f"attention heads must be one of {HEAD_MODES}, got {heads!r}")
        self.student_layers, self.teacher_layers, self.heads = student_layers, teacher_layers, heads
        self.layer_map = resolve_layer_map(layers, student_layers, teacher_layers)

    def forward(self, student_attentions: Sequence[Tensor], teacher_attentions: Sequence[Tensor],
                attention_mask: Tensor | None = None, key_mask: Tensor | None = None) -> Tensor:
        """Per-layer tuples of [B, H, T, K]; attention_mask [B, T] (query rows), key_mask [B, K]."""
        layer_outputs(student_attentions, self.student_layers, "attentions", "student", 0)
        layer_outputs(teacher_attentions, self.teacher_layers, "attentions", "teacher", 0)
        return attention_loss(student_attentions, teacher_attentions, attention_mask, self.layer_map, self.heads,
                              key_mask)


class EncoderDecoderAttentionDistiller(nn.Module):
    """Attention KD for encoder-decoder models: encoder self-attention, decoder self-attention and decoder
    cross-attention, each an `AttentionDistiller` with its own layer map (cross-attention lives in the decoder
    layers, so it maps decoder layers). The loss is the mean over `sides` (default all three), so each side weighs
    the same whatever its layer count; `sides=("decoder",)` gives the decoder-only term of earlier versions.
    An explicit `layers` list applies to every side and must fit each. No parameters.
    """

    requires = "attentions"

    def __init__(self, student_layers: tuple[int, int], teacher_layers: tuple[int, int],
                 layers: str | Sequence[Sequence[int]] = "uniform", heads: str = "auto",
                 sides: Sequence[str] | None = None) -> None:
        """student_layers / teacher_layers: (encoder layers, decoder layers)."""
        super().__init__()
        self.sides = check_sides(sides, ATTENTION_SIDES, "attention")
        self.per_side = nn.ModuleDict()
        for side in self.sides:
            n = 0 if side == "encoder" else 1
            try:
                self.per_side[side] = AttentionDistiller(student_layers[n], teacher_layers[n], layers, heads)
            except LossConfigError as err:
                raise LossConfigError(f"attention loss, {side} attentions: {err}") from err

    def forward(self, student_encoder: Sequence[Tensor] | None, teacher_encoder: Sequence[Tensor] | None,
                encoder_mask: Tensor, student_decoder: Sequence[Tensor] | None,
                teacher_decoder: Sequence[Tensor] | None, decoder_mask: Tensor,
                student_cross: Sequence[Tensor] | None = None, teacher_cross: Sequence[Tensor] | None = None) -> Tensor:
        """*_encoder: encoder self-attention tuples of [B, H, S, S], encoder_mask [B, S] (1 = source token);
        *_decoder: decoder self-attention tuples of [B, H, T, T], decoder_mask [B, T] (1 = counted label);
        *_cross: cross-attention tuples of [B, H, T, S] (needed only when "cross" is a side). Returns a scalar."""
        inputs = {"encoder": (student_encoder, teacher_encoder, encoder_mask, encoder_mask),
                  "decoder": (student_decoder, teacher_decoder, decoder_mask, decoder_mask),
                  "cross": (student_cross, teacher_cross, decoder_mask, encoder_mask)}
        return torch.stack([self.per_side[side](*inputs[side]) for side in self.sides]).mean()
