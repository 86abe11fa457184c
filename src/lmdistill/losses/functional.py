"""The logit losses as plain functions: each divergence, cross-entropy and top-k KL against a teacher cache.

Logits and labels arrive aligned: `student_logits[..., t, :]` is scored against `labels[..., t]` (the trainer
shifts once for causal models). Positions with label -100 count nowhere; `labels=None` counts every
position. `reduction="mean"` divides by the number of counted tokens (floored at 1), `"sum"` returns the sum
so a caller can divide by the count of a whole accumulated batch. KD terms include T^2. Work is done in
float32. `chunk_size` (tokens) bounds memory to one [chunk, V] block per model with identical results.
When the student and teacher vocabularies differ in size, KD terms use the shared prefix (the extra rows are
padding; checking that the tokenizers match is the model loader's job).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lmdistill.losses.divergences import (IGNORE_INDEX, TAILS, TermSpec, check_params, check_temperature,
                                          score_rows)
from lmdistill.losses.engine import reduce_rows
from lmdistill.losses.errors import LossConfigError, LossInputError

REDUCTIONS = ("mean", "sum")


def counted_rows(labels: Tensor | None, n_rows: int) -> tuple[Tensor | None, Tensor | None, int]:
    """Flatten labels [...] -> [N] and find the counted rows.

    Returns (flat labels or None, int64 indices of counted rows or None when all count, count).
    """
    if labels is None:
        return None, None, n_rows
    flat = labels.reshape(-1)
    if flat.shape[0] != n_rows:
        raise LossInputError(f"labels have {flat.shape[0]} positions but the logits/hidden states have {n_rows}; "
                             "pass labels shaped like the logits without their last dimension")
    keep = flat != IGNORE_INDEX
    count = int(keep.sum())
    return flat, (None if count == n_rows else keep.nonzero().squeeze(1)), count


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise LossConfigError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def finish(sums: Tensor, count: int, reduction: str) -> Tensor:
    """Sum -> requested reduction: mean over counted tokens (floored at 1 so no tokens gives 0) or sum."""
    return sums if check_reduction(reduction) == "sum" else sums / max(count, 1)


def backward_coeffs(labels: Tensor | None, n_rows: int, reduction: str, device: torch.device) -> Tensor:
    """The d loss / d sum a plain backward will send (1/count for a mean), so chunked gradients are formed
    at that scale in the forward and handed over without a rescaling copy."""
    if check_reduction(reduction) == "sum":
        return torch.ones((), device=device)
    count = n_rows if labels is None else int((labels != IGNORE_INDEX).sum())
    return torch.full((), 1.0 / max(count, 1), device=device)


def _check_pair(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.shape[:-1] != teacher.shape[:-1]:
        raise LossInputError(f"student {what} {tuple(student.shape)} and teacher {what} {tuple(teacher.shape)} "
                             "must agree on every dimension but the last; pass the same batch to both models")


def cache_rows(student: Tensor, what: str, vocab: int, teacher_ids: Tensor | None,
               teacher_logprobs: Tensor | None,
               teacher_tail: Tensor | None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Check a top-k cache against the student's [..., X] logits or hidden states (`what` names them) and a
    student vocabulary of `vocab`; flatten it to rows. teacher_ids / teacher_logprobs [..., k], teacher_tail [...]
    -> ([N, k], [N, k], [N] or None); all None without a cache."""
    if teacher_ids is None or teacher_logprobs is None:
        return None, None, None
    _check_pair(student, teacher_ids, f"{what} / cached ids")
    if teacher_ids.shape != teacher_logprobs.shape:
        raise LossInputError(f"teacher_ids {tuple(teacher_ids.shape)} and teacher_logprobs "
                             f"{tuple(teacher_logprobs.shape)} must have the same shape")
    if teacher_ids.numel() and int(teacher_ids.max()) >= vocab:
        raise LossInputError(f"cached teacher ids go up to {int(teacher_ids.max())} but the student vocabulary "
                             f"has {vocab} entries; the cache was made with another tokenizer: rebuild it")
    n_rows = student[..., 0].numel()
    tails = None
    if teacher_tail is not None:
        if teacher_tail.shape != teacher_ids.shape[:-1]:
            raise LossInputError(f"teacher_tail {tuple(teacher_tail.shape)} must be shaped like teacher_ids "
                                 f"without their last dimension, {tuple(teacher_ids.shape[:-1])}")
        tails = teacher_tail.reshape(n_rows)  # [N]
    k = teacher_ids.shape[-1]
    return teacher_ids.reshape(n_rows, k), teacher_logprobs.reshape(n_rows, k), tails  # [N, k], [N, k], also for N = 0


def logit_rows(student_logits: Tensor, teacher_logits: Tensor | None,
               labels: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, int]:
    """student_logits [..., V], teacher_logits [..., V'] or None, labels [...] -> rows: (student [N, V], teacher
    [N, V'] or None, flat labels [N] or None, int64 indices of the counted rows or None when all count, count)."""
    student = student_logits.reshape(-1, student_logits.shape[-1])  # [N, V]
    flat_labels, counted, count = counted_rows(labels, student.shape[0])
    teacher = None
    if teacher_logits is not None:
        _check_pair(student_logits, teacher_logits, "logits")
        teacher = teacher_logits.reshape(student.shape[0], teacher_logits.shape[-1])  # [N, V'], also for N = 0
    return student, teacher, flat_labels, counted, count


def logit_terms(specs: Sequence[TermSpec], student_logits: Tensor, teacher_logits: Tensor | None,
                labels: Tensor | None, chunk_size: int | None = None, coeffs: Tensor | None = None,
                teacher_ids: Tensor | None = None, teacher_logprobs: Tensor | None = None,
                teacher_tail: Tensor | None = None) -> tuple[Tensor, int]:
    """Term sums over counted tokens from full logits. student_logits [..., V]; teacher_logits [..., V'] or
    None; labels [...]; teacher_ids / teacher_logprobs [..., k] and teacher_tail [...] (or None) for topk_kl.
    Returns ([terms], count)."""
    student, teacher, flat_labels, counted, count = logit_rows(student_logits, teacher_logits, labels)
    ids, lps, tails = cache_rows(student_logits, "logits", student.shape[1], teacher_ids, teacher_logprobs,
                                 teacher_tail)

    def fn(rows: Sequence[Tensor | None], shared: Sequence[Tensor | None]) -> Tensor:
        return score_rows(specs, *rows)

    return reduce_rows(fn, [student, teacher, flat_labels, ids, lps, tails], [], counted, chunk_size, coeffs), count


def _divergence(name: str, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None,
                temperature: float, reduction: str, chunk_size: int | None, **params: float) -> Tensor:
    spec = TermSpec(name, check_temperature(temperature), check_params(name, params))
    coeffs = backward_coeffs(labels, student_logits[..., 0].numel(), reduction, student_logits.device)
    sums, count = logit_terms([spec], student_logits, teacher_logits, labels, chunk_size, coeffs)
    return finish(sums[0], count, reduction)


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, *,
               temperature: float = 1.0, reduction: str = "mean", chunk_size: int | None = None) -> Tensor:
    """T^2 KL(p || q), p = softmax(teacher / T), q = softmax(student / T). Logits [..., V], labels [...]."""
    return _divergence("forward_kl", student_logits, teacher_logits, labels, temperature, reduction, chunk_size)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, *,
               temperature: float = 1.0, reduction: str = "mean", chunk_size: int | None = None) -> Tensor:
    """T^2 KL(q || p). Logits [..., V], labels [...]."""
    return _divergence("reverse_kl", student_logits, teacher_logits, labels, temperature, reduction, chunk_size)


def jsd(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, *, beta: float = 0.5,
        temperature: float = 1.0, reduction: str = "mean", chunk_size: int | None = None) -> Tensor:
    """T^2 generalized JSD: beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q.

    beta = 0 gives forward KL and beta = 1 reverse KL, as TRL's GKD maps them. At T = 1 this equals TRL's
    `generalized_jsd_loss` (which applies no temperature and no T^2). Logits [..., V], labels [...].
    """
    return _divergence("jsd", student_logits, teacher_logits, labels, temperature, reduction, chunk_size, beta=beta)


def skew_kl(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, *, alpha: float = 0.1,
            temperature: float = 1.0, reduction: str = "mean", chunk_size: int | None = None) -> Tensor:
    """T^2 KL(p || alpha p + (1 - alpha) q) (DistiLLM skew KL), 0 <= alpha < 1. Logits [..., V]."""
    return _divergence("skew_kl", student_logits, teacher_logits, labels, temperature, reduction, chunk_size,
                       alpha=alpha)


def skew_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, *,
                    alpha: float = 0.1, temperature: float = 1.0, reduction: str = "mean",
                    chunk_size: int | None = None) -> Tensor:
    """T^2 KL(q || alpha q + (1 - alpha) p) (DistiLLM skew reverse KL), 0 <= alpha < 1. Logits [..., V]."""
    return _divergence("skew_reverse_kl", student_logits, teacher_logits, labels, temperature, reduction,
                       chunk_size, alpha=alpha)


def tvd(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, *,
        temperature: float = 1.0, reduction: str = "mean", chunk_size: int | None = None) -> Tensor:
    """T^2 total variation distance 0.5 sum_v |p - q|. Logits [..., V], labels [...]."""
    return _divergence("tvd", student_logits, teacher_logits, labels, temperature, reduction, chunk_size)


def cross_entropy(student_logits: Tensor, labels: Tensor, *, reduction: str = "mean",
                  chunk_size: int | None = None) -> Tensor:
    """Cross-entropy of the student (T = 1) on hard labels. Logits [..., V], labels [...] (-100 = skipped)."""
    coeffs = backward_coeffs(labels, student_logits[..., 0].numel(), reduction, student_logits.device)
    sums, count = logit_terms([TermSpec("cross_entropy")], student_logits, None, labels, chunk_size, coeffs)
    return finish(sums[0], count, reduction)


def topk_spec(temperature: float, cache_temperature: float, tail: str) -> TermSpec:
    if tail not in TAILS:
        raise LossConfigError(f"tail must be one of {TAILS}, got {tail!r}")
    return TermSpec("topk_kl", check_temperature(temperature),
                    {"cache_temperature": check_temperature(cache_temperature, "cache_temperature"), "tail": tail})


def topk_kl(student_logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor, labels: Tensor | None = None, *,
            temperature: float = 1.0, cache_temperature: float = 1.0, tail: str = "bucket",
            teacher_tail: Tensor | None = None, reduction: str = "mean", chunk_size: int | None = None) -> Tensor:
    """T^2 forward KL against a top-k teacher cache.

    student_logits [..., V]; teacher_ids [..., k] int64; teacher_logprobs [..., k] = log softmax(u / T_cache)
    at those ids; labels [...]; teacher_tail [...] the cache's stored mass outside the kept ids (None: taken as
    1 - sum(kept)). `tail="bucket"` scores k+1 buckets (kept ids + the rest), `"drop"` the k kept ids
    renormalised. Exact (equal to `forward_kl`) when k = V; see `divergences.topk_rows`.
    """
    spec = topk_spec(temperature, cache_temperature, tail)
    coeffs = backward_coeffs(labels, student_logits[..., 0].numel(), reduction, student_logits.device)
    sums, count = logit_terms([spec], student_logits, None, labels, chunk_size, coeffs,
                              teacher_ids=teacher_ids, teacher_logprobs=teacher_logprobs, teacher_tail=teacher_tail)
    return finish(sums[0], count, reduction)


LOGIT_LOSSES = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
    "cross_entropy": cross_entropy,
}
"""name -> function. KD functions take (student_logits, teacher_logits, labels, **keywords);
cross_entropy takes (student_logits, labels, **keywords)."""
