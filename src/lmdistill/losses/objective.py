"""The distillation objective: a weighted sum of logit terms, computed in one pass over the logits.

Each term is a SUM over counted tokens divided by `num_items`, the count of counted tokens across the whole
accumulated batch (supplied by the trainer; this call's count when None; floored at 1). So N micro-batches
accumulate to exactly the loss of one batch N times larger. All terms share one pass over the tokens (one
log-softmax per model and temperature), in full-logit, fused (hidden states + lm_head), cached (top-k
teacher) or fused-cached mode.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lmdistill.losses.closed_logits import closed_form_applies, closed_logit_terms
from lmdistill.losses.divergences import TermSpec, check_params, check_temperature
from lmdistill.losses.errors import LossConfigError
from lmdistill.losses.functional import LOGIT_LOSSES, counted_rows, logit_rows, logit_terms, topk_spec
from lmdistill.losses.fused import LMHead, fused_terms


@dataclass(frozen=True)
class LossTerm:
    """One named logit loss with its weight and keyword parameters, e.g. LossTerm("jsd", 0.7, {"beta": 0.5})."""

    name: str
    weight: float = 1.0
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in LOGIT_LOSSES:
            raise LossConfigError(f"unknown logit loss '{self.name}'; choose one of {', '.join(LOGIT_LOSSES)}")
        weight = self.weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise LossConfigError(f"loss '{self.name}': weight must be a finite number >= 0, got {weight!r}")
        object.__setattr__(self, "params", check_params(self.name, dict(self.params)))

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> LossTerm:
        """{"name": "jsd", "weight": 0.7, "beta": 0.5} -> LossTerm (every other key is a parameter)."""
        if "name" not in spec:
            raise LossConfigError(f"loss entry {dict(spec)} has no 'name'; add e.g. name: forward_kl")
        rest = {k: v for k, v in spec.items() if k not in ("name", "weight")}
        return cls(spec["name"], spec.get("weight", 1.0), rest)


@dataclass
class ObjectiveOutput:
    """total: scalar, sum_i weight_i * term_i. terms: each term's unweighted value, still in the graph."""

    total: Tensor
    terms: dict[str, Tensor]


class DistillObjective:
    """sum_i weight_i * term_i over logit terms; `seed_form` builds alpha*CE + (1-alpha)*KD."""

    def __init__(self, terms: Sequence[LossTerm], temperature: float = 1.0, chunk_size: int | None = None) -> None:
        if not terms:
            raise LossConfigError("the objective has no loss terms; add at least one, e.g. {name: forward_kl}")
        names = [t.name for t in terms]
        if len(set(names)) != len(names):
            raise LossConfigError(f"loss names repeat in {names}; list each loss once and set its weight")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise LossConfigError(f"chunk_size must be a positive number of tokens or None, got {chunk_size!r}")
        self.terms = list(terms)
        self.temperature = check_temperature(temperature)
        self.chunk_size = chunk_size
        self._weights = torch.tensor([t.weight for t in self.terms], dtype=torch.float32)

    @classmethod
    def seed_form(cls, alpha: float, kd: str = "forward_kl", temperature: float = 1.0,
                  chunk_size: int | None = None, **kd_params: float) -> DistillObjective:
        """Seed 002's `alpha * CE + (1 - alpha) * KD` (KD includes T^2)."""
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise LossConfigError(f"alpha (the weight of hard-label CE) must be in [0, 1], got {alpha!r}")
        if kd == "cross_entropy":
            raise LossConfigError("seed_form's kd must be a divergence, not cross_entropy")
        return cls([LossTerm("cross_entropy", alpha), LossTerm(kd, 1.0 - alpha, kd_params)], temperature, chunk_size)

    @property
    def needs_teacher(self) -> bool:
        return any(t.name != "cross_entropy" for t in self.terms)

    def _specs(self, kd: TermSpec | None = None) -> list[TermSpec]:
        """kd replaces every KD term's spec (cached mode); None keeps each divergence as configured."""
        return [TermSpec("cross_entropy") if t.name == "cross_entropy"
                else kd or TermSpec(t.name, self.temperature, t.params) for t in self.terms]

    def _denominator(self, labels: Tensor | None, n_rows: int, num_items: int | float | Tensor | None) -> float:
        count = counted_rows(labels, n_rows)[2] if num_items is None else float(num_items)
        return max(float(count), 1.0)

    def _coeffs(self, denom: float, device: torch.device) -> Tensor:
        """d total / d sums, so chunked gradients are formed at the scale a plain backward asks for."""
        return self._weights.to(device) / denom

    def _output(self, sums: Tensor, denom: float) -> ObjectiveOutput:
        values = sums / denom  # [terms]
        terms = {t.name: values[i] for i, t in enumerate(self.terms)}
        return ObjectiveOutput((values * self._weights.to(values.device)).sum(), terms)

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor | None,
                 num_items: int | float | Tensor | None = None) -> ObjectiveOutput:
        """student_logits [..., V], teacher_logits [..., V'] (None if not needs_teacher), labels [...]."""
        self._require_teacher(teacher_logits)
        denom = self._denominator(labels, student_logits[..., 0].numel(), num_items)
        specs = self._specs()
        if closed_form_applies(specs, student_logits, teacher_logits):  # the gradient written out, no autograd graph
            student, teacher, flat_labels, counted, _ = logit_rows(student_logits, teacher_logits, labels)
            sums = closed_logit_terms(specs, [t.weight / denom for t in self.terms], student, teacher, flat_labels,
                                      counted)
        else:
            sums, _ = logit_terms(specs, student_logits, teacher_logits, labels, self.chunk_size,
                                  self._coeffs(denom, student_logits.device))
        return self._output(sums, denom)

    def fused(self, student_hidden: Tensor, student_weight: Tensor, student_bias: Tensor | None,
              teacher_hidden: Tensor | Sequence[Tensor] | None, teacher_weight: Tensor | Sequence[Tensor] | None,
              teacher_bias: Tensor | Sequence[Tensor | None] | None, labels: Tensor | None,
              num_items: int | float | Tensor | None = None, student_softcap: float | None = None,
              teacher_softcap: float | Sequence[float | None] | None = None, student_logit_scale: float = 1.0,
              teacher_logit_scale: float | Sequence[float] = 1.0,
              mixture: Sequence[float] | None = None) -> ObjectiveOutput:
        """Hidden states [..., H] and lm_head weights [V, H] in place of logits; full logits never exist.
        Chunks of `chunk_size` tokens (`fused.default_chunk_size` when the objective has none). Several teachers:
        `mixture` their weights and every teacher argument a sequence, one per teacher; the target is their
        mixture at the objective's temperature, as `__call__` gets it from `losses.mixture.mixture_logits`."""
        self._require_teacher(teacher_hidden if teacher_weight is not None else None)
        student = LMHead(student_weight, student_bias, student_softcap, student_logit_scale)
        teacher: LMHead | list[LMHead] | None = None
        if teacher_weight is not None and self.needs_teacher:
            teacher = (LMHead(teacher_weight, teacher_bias, teacher_softcap, teacher_logit_scale) if mixture is None
                       else [LMHead(*head) for head in zip(teacher_weight, teacher_bias, teacher_softcap,
                                                          teacher_logit_scale, strict=True)])
        denom = self._denominator(labels, student_hidden[..., 0].numel(), num_items)
        sums, _ = fused_terms(self._specs(), student_hidden, student, teacher_hidden, teacher, labels,
                              self.chunk_size, self._coeffs(denom, student_hidden.device), mixture=mixture,
                              mixture_temperature=self.temperature)
        return self._output(sums, denom)

    def cached(self, student_logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor, labels: Tensor | None,
               num_items: int | float | Tensor | None = None, cache_temperature: float = 1.0,
               tail: str = "bucket", teacher_tail: Tensor | None = None) -> ObjectiveOutput:
        """KD against a top-k teacher cache (ids / log-probs [..., k]); only forward_kl is defined there.

        teacher_tail [...]: the mass outside the kept ids as the cache stored it (summed over the full
        vocabulary at capture); None rebuilds it as 1 - sum(exp(kept)), which fp16 rounding blurs for small
        tails."""
        specs = self._cached_specs(cache_temperature, tail)
        denom = self._denominator(labels, student_logits[..., 0].numel(), num_items)
        sums, _ = logit_terms(specs, student_logits, None, labels, self.chunk_size,
                              self._coeffs(denom, student_logits.device), teacher_ids, teacher_logprobs,
                              teacher_tail)
        return self._output(sums, denom)

    def fused_cached(self, student_hidden: Tensor, student_weight: Tensor, student_bias: Tensor | None,
                     teacher_ids: Tensor, teacher_logprobs: Tensor, labels: Tensor | None,
                     num_items: int | float | Tensor | None = None, cache_temperature: float = 1.0,
                     tail: str = "bucket", teacher_tail: Tensor | None = None, student_softcap: float | None = None,
                     student_logit_scale: float = 1.0) -> ObjectiveOutput:
        """`cached` on the logits of student_hidden [..., H] through the lm_head (weight [V, H], bias [V] or None),
        which never exist whole: chunks of `chunk_size` tokens (`fused.default_chunk_size` when the objective
        has none). teacher_ids / teacher_logprobs [..., k], teacher_tail [...] as in `cached`; equal loss and
        gradients (w.r.t. hidden states, weight and bias)."""
        specs = self._cached_specs(cache_temperature, tail)
        student = LMHead(student_weight, student_bias, student_softcap, student_logit_scale)
        denom = self._denominator(labels, student_hidden[..., 0].numel(), num_items)
        sums, _ = fused_terms(specs, student_hidden, student, None, None, labels,
                              self.chunk_size, self._coeffs(denom, student_hidden.device), teacher_ids, teacher_logprobs,
                              teacher_tail)
        return self._output(sums, denom)

    def _cached_specs(self, cache_temperature: float, tail: str) -> list[TermSpec]:
        """The terms against a top-k cache: forward_kl becomes topk_kl; every other divergence needs the full
        teacher distribution, which the cache does not hold."""
        other = [t.name for t in self.terms if t.name not in ("forward_kl", "cross_entropy")]
        if other:
            raise LossConfigError(f"a cached (top-k) teacher supports only forward_kl and cross_entropy, not "
                                  f"{', '.join(other)}; use a live teacher for those losses or switch to forward_kl")
        return self._specs(topk_spec(self.temperature, cache_temperature, tail))

    def _require_teacher(self, teacher: Tensor | None) -> None:
        if teacher is None and self.needs_teacher:
            kd = [t.name for t in self.terms if t.name != "cross_entropy"]
            raise LossConfigError(f"losses {', '.join(kd)} need the teacher's outputs, got None; "
                                  "run the teacher or keep only cross_entropy")
