"""Token-level divergences between teacher and student distributions, and their parameters.

Every kernel here takes float32 log-probabilities of one block of counted tokens, teacher `lp` and
student `lq`, both [n, V], and returns one value per token, [n]. The mechanics (temperature, T^2, masking,
chunking, reduction) live in `score_rows` and in `engine.py`, so a new divergence is one function plus one
line in `KERNELS` and `PARAMS`.

With p = softmax(teacher / T) and q = softmax(student / T):
    forward_kl       sum_v p (log p - log q)
    reverse_kl       sum_v q (log q - log p)
    jsd(beta)        beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q   (TRL GKD;
                     beta = 0 is forward KL and beta = 1 reverse KL, as TRL maps them)
    skew_kl(alpha)   KL(p || alpha p + (1 - alpha) q)          (DistiLLM)
    skew_reverse_kl  KL(q || alpha q + (1 - alpha) p)          (DistiLLM)
    tvd              0.5 sum_v |p - q|
Mixtures are formed in log space (logaddexp), never as softmax-then-log.

Logits may hold -inf (masked vocabulary rows, a top-k / top-p filtered teacher): a token one side gives no mass adds
nothing to a sum weighted by that side (0 log 0 = 0, as torchtune and DistiLLM take it), so every divergence stays
finite, and so do its gradients; only KL(a || b) with a > 0 = b is +inf (reverse KL where q > 0 = p).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lmdistill.losses.errors import LossConfigError, LossInputError

IGNORE_INDEX = -100
Kernel = Callable[..., Tensor]


def upcast(x: Tensor) -> Tensor:
    """Compute in float32, or in float64 when given float64 (gradcheck, references)."""
    return x if x.dtype == torch.float64 else x.float()


def _kl(lp: Tensor, lq: Tensor) -> Tensor:
    """KL(p || q) per token from log-probs [n, V] -> [n]. Where p = 0 the log ratio is zeroed before the product
    (0 log 0 = 0, whatever q is), so that no 0 * inf reaches the value or the gradients."""
    p = lp.exp()
    return (p * torch.where(p > 0, lp - lq, 0.0)).sum(-1)


def _log_mixture(lp: Tensor, lq: Tensor, weight_p: float) -> Tensor:
    """log(weight_p p + (1 - weight_p) q) [n, V]. -inf inputs are floored at the dtype's lowest value: where both
    sides are -inf the mixture is then finite (unused: neither side weighs it) and logaddexp's gradient no NaN."""
    floor = torch.finfo(lp.dtype).min
    return torch.logaddexp(lp.clamp_min(floor) + math.log(weight_p), lq.clamp_min(floor) + math.log1p(-weight_p))


def _kl_to_mixture(lp: Tensor, lq: Tensor, weight_p: float) -> Tensor:
    """KL(p || weight_p p + (1 - weight_p) q) per token, mixture in log space: [n, V] -> [n]."""
    return _kl(lp, _log_mixture(lp, lq, weight_p))


def forward_kl_kernel(lp: Tensor, lq: Tensor) -> Tensor:
    return _kl(lp, lq)


def reverse_kl_kernel(lp: Tensor, lq: Tensor) -> Tensor:
    return _kl(lq, lp)


def jsd_kernel(lp: Tensor, lq: Tensor, beta: float) -> Tensor:
    if beta == 0.0:  # TRL GKD's mapping: the formula tends to 0 here, TRL uses forward KL instead
        return _kl(lp, lq)
    if beta == 1.0:
        return _kl(lq, lp)
    log_mix = _log_mixture(lp, lq, beta)
    return beta * _kl(lp, log_mix) + (1.0 - beta) * _kl(lq, log_mix)


def skew_kl_kernel(lp: Tensor, lq: Tensor, alpha: float) -> Tensor:
    return _kl(lp, lq) if alpha == 0.0 else _kl_to_mixture(lp, lq, alpha)


def skew_reverse_kl_kernel(lp: Tensor, lq: Tensor, alpha: float) -> Tensor:
    return _kl(lq, lp) if alpha == 0.0 else _kl_to_mixture(lq, lp, alpha)


def tvd_kernel(lp: Tensor, lq: Tensor) -> Tensor:
    return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)


KERNELS: dict[str, Kernel] = {
    "forward_kl": forward_kl_kernel,
    "reverse_kl": reverse_kl_kernel,
    "jsd": jsd_kernel,
    "skew_kl": skew_kl_kernel,
    "skew_reverse_kl": skew_reverse_kl_kernel,
    "tvd": tvd_kernel,
}


def _unit_interval(closed_right: bool) -> Callable[[str, str, float], None]:
    def check(loss: str, key: str, value: float) -> None:
        ok = 0.0 <= value <= 1.0 if closed_right else 0.0 <= value < 1.0
        if not ok:
            bound = "[0, 1]" if closed_right else "[0, 1)"
            raise LossConfigError(f"loss '{loss}': {key}={value} is outside {bound}; pick a value in {bound}")
    return check


# name -> {param: (default, range check)}. cross_entropy and topk_kl are handled by score_rows, not KERNELS.
PARAMS: dict[str, dict[str, tuple[Any, Callable[[str, str, Any], None]]]] = {
    "forward_kl": {},
    "reverse_kl": {},
    "jsd": {"beta": (0.5, _unit_interval(closed_right=True))},
    "skew_kl": {"alpha": (0.1, _unit_interval(closed_right=False))},
    "skew_reverse_kl": {"alpha": (0.1, _unit_interval(closed_right=False))},
    "tvd": {},
    "cross_entropy": {},
}
TAILS = ("bucket", "drop")


def check_params(name: str, params: Mapping[str, Any]) -> dict[str, float]:
    """Validate a logit loss's parameters and fill defaults. Raises LossConfigError naming the bad key."""
    if name not in PARAMS:
        raise LossConfigError(f"unknown logit loss '{name}'; choose one of {', '.join(PARAMS)}")
    allowed = PARAMS[name]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        accepted = ", ".join(allowed) or "none"
        raise LossConfigError(f"loss '{name}': unknown parameter(s) {', '.join(unknown)}; accepted: {accepted}")
    resolved: dict[str, float] = {}
    for key, (default, check) in allowed.items():
        value = params.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LossConfigError(f"loss '{name}': {key} must be a number, got {value!r}")
        check(name, key, float(value))
        resolved[key] = float(value)
    return resolved


def check_temperature(value: Any, where: str = "temperature") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise LossConfigError(f"{where} must be a positive finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class TermSpec:
    """One logit term scored on a block of tokens: a KERNELS name, 'cross_entropy' or 'topk_kl'.

    `params` holds the kernel's keyword arguments (checked by `check_params`); for 'topk_kl' it holds
    `cache_temperature` and `tail`.
    """

    name: str
    temperature: float = 1.0
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def needs_teacher_logits(self) -> bool:
        return self.name in KERNELS


def topk_rows(student: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor, temperature: float,
              cache_temperature: float, tail: str, teacher_tail: Tensor | None = None) -> Tensor:
    """Top-k KL(p || q) per token against cached teacher log-probs.

    student [n, V] logits; teacher_ids [n, k] int64; teacher_logprobs [n, k] = log softmax(u / T_cache)
    at those ids; teacher_tail [n] (optional) = the mass outside the kept ids, as the cache stored it.
    Returns [n] (without T^2). The kept teacher probs are re-tempered p^(T_cache/T); the student
    log-softmax runs over the full vocabulary before gathering. `bucket` scores k+1 buckets (the kept ids
    and one tail, whose re-tempered mass is tail^(T_cache/T), renormalised with the kept ones); the tail is
    the stored one when given, else 1 - sum(kept). `drop` renormalises both sides over the k kept ids.
    Both are exact when k = V.
    """
    lq = F.log_softmax(upcast(student) / temperature, dim=-1)  # [n, V]
    lq_kept = lq.gather(-1, teacher_ids)  # [n, k]
    tempered = upcast(teacher_logprobs) * (cache_temperature / temperature)  # [n, k], log p^(Tc/T)
    if tail == "drop":
        lp = F.log_softmax(tempered, dim=-1)
        lq_norm = lq_kept - torch.logsumexp(lq_kept, dim=-1, keepdim=True)
        return _kl(lp, lq_norm)
    if teacher_ids.shape[-1] == student.shape[-1]:
        tail_mass = tempered.new_zeros(tempered.shape[:-1])  # k = V: no tail; 1 - sum would be rounding noise
    elif teacher_tail is not None:
        # Summed from the full distribution at capture: 1 - sum(kept) would drown a small tail in the rounding
        # of k fp16 log-probs.
        tail_mass = upcast(teacher_tail).to(tempered.dtype)  # [n]
    else:
        # clamp: only rounding in the cached log-probs can push the kept sum past 1
        tail_mass = (1.0 - teacher_logprobs.double().exp().sum(-1)).clamp_min(0.0).to(tempered.dtype)  # [n]
    lp = F.log_softmax(torch.cat([tempered, (tail_mass.log() * (cache_temperature / temperature))[:, None]], -1), -1)
    # Student tail = log of the mass outside the kept ids; a finite fill keeps gradients finite when k = V.
    outside = lq.scatter(-1, teacher_ids, torch.finfo(lq.dtype).min)  # [n, V]
    lq_buckets = torch.cat([lq_kept, torch.logsumexp(outside, dim=-1, keepdim=True)], -1)  # [n, k + 1]
    return _kl(lp, lq_buckets)


def score_rows(specs: Sequence[TermSpec], student: Tensor, teacher: Tensor | None, labels: Tensor | None,
               teacher_ids: Tensor | None = None, teacher_logprobs: Tensor | None = None,
               teacher_tail: Tensor | None = None) -> Tensor:
    """Sum of each term over a block of counted tokens.

    student [n, V] logits; teacher [n, V] logits (or None when no term needs them); labels [n] (all
    counted: masking happened before); teacher_ids / teacher_logprobs [n, k] and teacher_tail [n] (or
    None) for 'topk_kl'.
    Returns [len(specs)] float32 (float64 for float64 input) sums; KD terms include T^2, cross_entropy uses T = 1.
    """
    student = upcast(student)
    log_probs: dict[tuple[str, float], Tensor] = {}  # shared between terms at the same temperature

    def log_softmax(which: str, logits: Tensor, temperature: float) -> Tensor:
        key = (which, temperature)
        if key not in log_probs:  # dividing by T = 1 would copy [n, V] (and its gradient) for nothing
            log_probs[key] = F.log_softmax(upcast(logits) / temperature if temperature != 1.0 else upcast(logits), -1)
        return log_probs[key]

    sums = []
    for spec in specs:
        t = spec.temperature
        if spec.name == "cross_entropy":
            if labels is None:
                raise LossInputError("cross_entropy needs labels: pass the token ids to score (-100 = not counted)")
            sums.append(F.cross_entropy(student, labels, reduction="sum"))
        elif spec.name == "topk_kl":
            if teacher_ids is None or teacher_logprobs is None:
                raise LossInputError("topk_kl needs teacher_ids and teacher_logprobs from a teacher cache")
            sums.append(t * t * topk_rows(student, teacher_ids, teacher_logprobs, t, teacher_tail=teacher_tail,
                                                  **spec.params).sum())
        else:
            if teacher is None:
                raise LossInputError(f"{spec.name} needs teacher logits, got None")
            vocab = min(student.shape[-1], teacher.shape[-1])  # rows past the shared size are padding
            lp, lq = log_softmax("teacher", teacher[:, :vocab], t), log_softmax("student", student[:, :vocab], t)
            sums.append(t * t * KERNELS[spec.name](lp, lq, **spec.params).sum())
    return torch.stack(sums)
