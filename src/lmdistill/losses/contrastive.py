"""Contrastive representation distillation: InfoNCE between pooled student and teacher representations.

Causal LMs: one `ContrastiveDistiller` over the last hidden state. Encoder-decoder models (T5, BART):
`EncoderDecoderContrastiveDistiller`, one InfoNCE per side (encoder states pooled over source tokens, decoder states
over counted labels), each with its own projections, averaged over the sides it was built for.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmdistill.losses.divergences import check_temperature
from lmdistill.losses.sides import check_sides

CONTRASTIVE_SIDES = ("encoder", "decoder")


def masked_mean_pool(hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
    """hidden [B, T, d] -> [B, d], the mean over attended tokens. (Not the first token: in a causal LM it has
    seen only itself, so it is the same for every row.)"""
    if attention_mask is None:
        return hidden.mean(1)
    mask = attention_mask.to(hidden.dtype)[..., None]  # [B, T, 1]
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class ContrastiveDistiller(nn.Module):
    """Symmetric InfoNCE across the batch: row i of the student should match row i of the teacher and no other.

    Both pooled last hidden states go through a trainable Linear into a shared space of `proj_dim` (default:
    the teacher width), are L2-normalised, and scored by cosine / temperature. Needs batches of >= 2 rows to
    carry signal (with one row the loss is 0).
    """

    requires = "hidden_states"

    def __init__(self, student_hidden_size: int, teacher_hidden_size: int, proj_dim: int | None = None,
                 temperature: float = 0.1) -> None:
        super().__init__()
        proj_dim = proj_dim or teacher_hidden_size
        self.temperature = check_temperature(temperature, "contrastive temperature")
        self.student_proj = nn.Linear(student_hidden_size, proj_dim)
        self.teacher_proj = nn.Linear(teacher_hidden_size, proj_dim)

    def forward(self, student_states: Sequence[Tensor] | Tensor, teacher_states: Sequence[Tensor] | Tensor,
                attention_mask: Tensor | None = None) -> Tensor:
        """States: `output_hidden_states=True` tuples (the last entry is used) or last hidden states [B, T, d].
        attention_mask [B, T]. Returns a scalar."""
        student = student_states if isinstance(student_states, Tensor) else student_states[-1]
        teacher = teacher_states if isinstance(teacher_states, Tensor) else teacher_states[-1]
        z_s = F.normalize(self.student_proj(masked_mean_pool(student.float(), attention_mask)), dim=-1)  # [B, p]
        z_t = F.normalize(self.teacher_proj(masked_mean_pool(teacher.float(), attention_mask)), dim=-1)  # [B, p]
        logits = z_s @ z_t.T / self.temperature  # [B, B]
        targets = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


class EncoderDecoderContrastiveDistiller(nn.Module):
    """InfoNCE on each side of an encoder-decoder model, each side a `ContrastiveDistiller` with its own projections.

    The encoder side pools the last encoder state over source tokens (the encoder attention mask), the decoder side
    the last decoder state over target tokens (the decoder label mask). The loss is the mean over `sides` (default
    both), so each side weighs the same; `sides=("decoder",)` gives the decoder-only term of earlier versions.
    """

    requires = "hidden_states"

    def __init__(self, student_hidden_size: int, teacher_hidden_size: int, proj_dim: int | None = None,
                 temperature: float = 0.1, sides: Sequence[str] | None = None) -> None:
        super().__init__()
        self.sides = check_sides(sides, CONTRASTIVE_SIDES, "contrastive")
        # Only the chosen sides get projections, so nothing untrained lands in the optimiser or the checkpoint.
        self.per_side = nn.ModuleDict({side: ContrastiveDistiller(student_hidden_size, teacher_hidden_size, proj_dim,
                                                                  temperature) for side in self.sides})

    def forward(self, student_encoder: Sequence[Tensor] | Tensor, teacher_encoder: Sequence[Tensor] | Tensor,
                encoder_mask: Tensor, student_decoder: Sequence[Tensor] | Tensor,
                teacher_decoder: Sequence[Tensor] | Tensor, decoder_mask: Tensor) -> Tensor:
        """*_encoder: encoder hidden-state tuples (last entry used) or last states [B, S, d], encoder_mask [B, S]
        (1 = source token); *_decoder: the same for the decoder, [B, T, d], decoder_mask [B, T] (1 = counted
        label). Returns a scalar."""
        inputs = {"encoder": (student_encoder, teacher_encoder, encoder_mask),
                  "decoder": (student_decoder, teacher_decoder, decoder_mask)}
        return torch.stack([self.per_side[side](*inputs[side]) for side in self.sides]).mean()
