"""Attention distillation: KL(teacher || student) between attention distributions of mapped layers.

Needs the attention probabilities, which only the eager attention implementation returns: load both models
with `attn_implementation="eager"` and call them with `output_attentions=True` (SDPA / flash attention return
None, and the loss says so). Heads are matched by `heads`: `"average"` compares head-averaged maps; `"group"`
averages consecutive groups of heads of the model with more heads down to the other's count (one count must
divide the other); `"auto"` groups when it can and averages otherwise. Query rows of padding are not counted.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lmdistill.losses.errors import LossConfigError, LossInputError
from lmdistill.losses.layers import layer_outputs, resolve_layer_map

HEAD_MODES = ("auto", "average", "group")


def match_heads(student: Tensor, teacher: Tensor, heads: str) -> tuple[Tensor, Tensor]:
    """student [B, Hs, T, T], teacher [B, Ht, T, T] -> both [B, H, T, T] with the same H."""
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


def attention_kl(student: Tensor, teacher: Tensor, attention_mask: Tensor | None, heads: str = "auto") -> Tensor:
    """Mean KL(teacher || student) over heads and attended query rows of one layer. Maps [B, H, T, T]."""
    if student.shape[-2:] != teacher.shape[-2:] or student.shape[0] != teacher.shape[0]:
        raise LossInputError(f"student attentions {tuple(student.shape)} and teacher attentions "
                             f"{tuple(teacher.shape)} must cover the same batch and tokens")
    student, teacher = match_heads(student.float(), teacher.float(), heads)
    # A zero student probability where the teacher has mass would make KL infinite; the floor keeps it finite.
    log_student = student.clamp_min(torch.finfo(torch.float32).tiny).log()
    per_row = (torch.special.xlogy(teacher, teacher) - teacher * log_student).sum(-1)  # [B, H, T]
    if attention_mask is None:
        return per_row.mean()
    rows = attention_mask.to(per_row.dtype)[:, None, :].expand_as(per_row)
    return (per_row * rows).sum() / rows.sum().clamp_min(1.0)


def attention_loss(student_attentions: Sequence[Tensor], teacher_attentions: Sequence[Tensor],
                   attention_mask: Tensor | None = None, layers: str | Sequence[Sequence[int]] = "uniform",
                   heads: str = "auto") -> Tensor:
    """Attention KD averaged over mapped layer pairs. Inputs are `output_attentions=True` tuples of [B, H, T, T]
    (one per layer, no embeddings entry); attention_mask [B, T]. Returns a scalar."""
    if heads not in HEAD_MODES:
        raise LossConfigError(f"attention heads must be one of {HEAD_MODES}, got {heads!r}")
    if not student_attentions or not teacher_attentions or any(
            a is None for a in (*student_attentions, *teacher_attentions)):
        raise LossInputError("attentions are missing: load both models with attn_implementation='eager' and call "
                             "them with output_attentions=True")
    pairs = resolve_layer_map(layers, len(student_attentions), len(teacher_attentions))
    return torch.stack([attention_kl(student_attentions[s], teacher_attentions[t], attention_mask, heads)
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
                attention_mask: Tensor | None = None) -> Tensor:
        layer_outputs(student_attentions, self.student_layers, "attentions", "student", 0)
        layer_outputs(teacher_attentions, self.teacher_layers, "attentions", "teacher", 0)
        return attention_loss(student_attentions, teacher_attentions, attention_mask, self.layer_map, self.heads)
