"""Contrastive representation distillation: InfoNCE between pooled student and teacher representations.

Causal LMs: one `ContrastiveDistiller` over the last hidden state. Encoder-decoder models (T5, BART):
`EncoderDecoderContrastiveDistiller`, one InfoNCE per side (encoder states pooled over source tokens, decoder states
over counted labels), each with its own projections, averaged over the sides it was built for.

Each example's InfoNCE weighs as many counted tokens as it has, as in the token means of the other terms; examples
with none take no part. Under several processes (torch.distributed initialised) the negatives are every process's
examples: the value is the same on every process, and the gradient flows through this process's rows only, so the
processes' gradients add up to the whole one (see lmdistill.train.hidden_terms.global_share).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.distributed as dist
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


def gather_rows(local: Tensor) -> Tensor:
    """[b, ...] on this process -> [sum of every process's b, ...] in process order, this process's rows being `local`
    itself (with its gradient) and the others' constants. Without torch.distributed: `local`."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = [torch.zeros((), dtype=torch.long, device=local.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor(local.shape[0], device=local.device))
    sizes = [int(n) for n in sizes]
    padded = local.detach().new_zeros((max(sizes), *local.shape[1:]))  # all_gather needs equal shapes
    padded[: local.shape[0]] = local.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    rows = [part[:n] for part, n in zip(parts, sizes)]
    rows[rank] = local
    return torch.cat(rows)


def info_nce(z_s: Tensor, z_t: Tensor, weights: Tensor, temperature: float, num_items: Tensor | float | None) -> Tensor:
    """Symmetric InfoNCE of L2-normalised rows z_s / z_t [n, p] (row i of one matches row i of the other), each
    row's loss times weights [n], summed and divided by num_items (None: the sum of the weights, at least 1)."""
    logits = z_s @ z_t.T / temperature  # [n, n]
    targets = torch.arange(logits.shape[0], device=logits.device)
    per_row = 0.5 * (F.cross_entropy(logits, targets, reduction="none")
                     + F.cross_entropy(logits.T, targets, reduction="none"))  # [n]
    denom = weights.sum().clamp_min(1.0) if num_items is None else num_items
    return (per_row * weights).sum() / denom


class ContrastiveDistiller(nn.Module):
    """Symmetric InfoNCE across the batch: row i of the student should match row i of the teacher and no other.

    Both pooled last hidden states go through a trainable Linear into a shared space of `proj_dim` (default:
    the teacher width), are L2-normalised, and scored by cosine / temperature. Needs >= 2 rows over all processes to
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
                attention_mask: Tensor | None = None, num_items: Tensor | float | None = None,
                weights: Tensor | None = None) -> Tensor:
        """States: `output_hidden_states=True` tuples (the last entry is used) or last hidden states [B, T, d].
        attention_mask [B, T]: the tokens pooled; weights [B]: each example's weight (default: its tokens in the
        mask). Returns sum_i weight_i * InfoNCE_i over every process's examples / num_items (None: / sum of weights),
        a scalar."""
        student = student_states if isinstance(student_states, Tensor) else student_states[-1]
        teacher = teacher_states if isinstance(teacher_states, Tensor) else teacher_states[-1]
        if weights is None:
            weights = (attention_mask.sum(1) if attention_mask is not None
                       else torch.full(student.shape[:1], student.shape[1], device=student.device))
        keep = weights > 0  # examples with no counted token take no part, as anchors or as negatives
        mask = attention_mask[keep] if attention_mask is not None else None
        z_s = F.normalize(self.student_proj(masked_mean_pool(student[keep].float(), mask)), dim=-1)  # [b, p]
        z_t = F.normalize(self.teacher_proj(masked_mean_pool(teacher[keep].float(), mask)), dim=-1)  # [b, p]
        p = z_s.shape[-1]
        rows = gather_rows(torch.cat([z_s, z_t, weights[keep].to(z_s.dtype)[:, None]], -1))  # one gather for all three
        return info_nce(rows[:, :p], rows[:, p: 2 * p], rows[:, -1], self.temperature, num_items)


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
                teacher_decoder: Sequence[Tensor] | Tensor, decoder_mask: Tensor,
                num_items: Tensor | float | None = None) -> Tensor:
        """*_encoder: encoder hidden-state tuples (last entry used) or last states [B, S, d], encoder_mask [B, S]
        (1 = source token); *_decoder: the same for the decoder, [B, T, d], decoder_mask [B, T] (1 = counted
        label). Both sides weigh each example by its counted labels. Returns a scalar, as ContrastiveDistiller."""
        inputs = {"encoder": (student_encoder, teacher_encoder, encoder_mask),
                  "decoder": (student_decoder, teacher_decoder, decoder_mask)}
        weights = decoder_mask.sum(1)
        return torch.stack([self.per_side[side](*inputs[side], num_items=num_items, weights=weights)
                            for side in self.sides]).mean()
