"""The target of several teachers: the weighted mixture of their distributions at the KD temperature.

    log p_mix = logsumexp_k( log w_k + log_softmax(z_k / T) ),   w normalised to sum 1

formed in log space, so a token one teacher gives no mass (-inf) stays exact and nothing underflows. The result is
returned as pseudo-logits `T * log p_mix`: every divergence divides teacher logits by T and takes log_softmax, which
gives back log p_mix (already normalised), so all of them accept a mixture unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lmdistill.losses.divergences import check_temperature, upcast
from lmdistill.losses.errors import LossConfigError


def mixture_log_probs(teacher_logits: Sequence[Tensor], weights: Sequence[float], temperature: float = 1.0) -> Tensor:
    """log sum_k w_k softmax(z_k / T) over the vocabulary rows every teacher has: logits [..., V_k] -> [..., min V_k],
    float32 (float64 when given float64)."""
    if not teacher_logits or len(teacher_logits) != len(weights):
        raise LossConfigError(f"mixture: {len(teacher_logits)} teachers' logits but {len(weights)} weights")
    if any(isinstance(w, bool) or not math.isfinite(w) or w <= 0 for w in weights):
        raise LossConfigError(f"mixture weights must be finite numbers > 0, got {list(weights)}")
    temperature = check_temperature(temperature)
    vocab = min(z.shape[-1] for z in teacher_logits)
    total = float(sum(weights))
    parts = [torch.log_softmax(upcast(z[..., :vocab]) / temperature, dim=-1) + math.log(w / total)
             for z, w in zip(teacher_logits, weights)]
    return torch.logsumexp(torch.stack(parts), dim=0)


def mixture_logits(teacher_logits: Sequence[Tensor], weights: Sequence[float], temperature: float = 1.0) -> Tensor:
    """The mixture as teacher logits for any divergence at `temperature`: T * log p_mix."""
    return mixture_log_probs(teacher_logits, weights, temperature) * temperature
