"""Logit losses between models whose vocabularies differ (cross-tokenizer distillation).

Rows arrive paired: student_logits[n] and teacher_logits[n] are the two models' logits at one aligned position (the
last token of an aligned span on each side; see lmdistill.data.align), so both predict the same continuation. The
vocabularies may differ in size and meaning.

    uld             Universal Logit Distillation (Boizard et al., 2024): sum_k |sort(p_s)_k - sort(p_t)_k|, each
                    distribution sorted in descending order and padded with zeros to the longer vocabulary. It
                    compares the shapes of the two distributions, not which token gets which mass. Not a KL, so no
                    T^2 factor.
    cross_vocab_kl  GOLD's hybrid: ids whose token strings match exactly in both vocabularies (`shared_s[m]` in the
                    student's vocabulary is `shared_t[m]` in the teacher's) get a forward KL over that shared
                    sub-vocabulary, both distributions renormalised over it (T^2 applied); the other ids of each side
                    get the ULD distance between their (unrenormalised) sorted probabilities. The two parts are weighed
                    by the share of the teacher's vocabulary that is shared, w = M / V_t: w KL + (1 - w) ULD, so with
                    identical vocabularies the term is the forward KL.

Against a teacher cache (`topk_uld`, `topk_cross_vocab_kl`), the teacher is known only by its k most likely ids
of its V_t (log softmax(u / T_cache), most likely first) and the stored mass outside them, the tail. The cached
forms read the teacher as the distribution that keeps those k probabilities and spreads the tail evenly over the
other V_t - k ids (each gets tail / (V_t - k), no more than the smallest kept one, so the sorted order holds).
At another stage temperature T every probability is re-tempered, p^(T_cache/T), and the whole renormalised: exact
for the kept ids, the tail's spread a guess. tail="drop" instead renormalises the k kept ids and ignores the rest.
    topk_uld             ULD against that distribution, sorted: the k kept probabilities, then the spread tail.
    topk_cross_vocab_kl  the KL part over the shared ids: each kept shared id on its own, the shared ids outside
                         the top k as one bucket (teacher: its even share of the tail, tail / (V_t - k) per id;
                         student: its mass on those ids), both renormalised over the shared sub-vocabulary; with
                         "drop", both renormalised over the kept shared ids only. The ULD part compares the
                         student's other ids with the kept non-shared ids followed by their even tail share.
                         Weighed w = M / V_t as the live form.
With k = V_t both equal the live forms.

All return a sum over rows (reduction="sum", the objective divides by its token count) or the mean over rows.
Computation is in float32 (float64 when given float64).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lmdistill.losses.divergences import TAILS, upcast
from lmdistill.losses.errors import LossInputError


def _check(student_logits: Tensor, teacher_logits: Tensor, temperature: float, reduction: str) -> None:
    if student_logits.dim() != 2 or teacher_logits.dim() != 2 or student_logits.shape[0] != teacher_logits.shape[0]:
        raise LossInputError(f"paired logits must be [N, V_student] and [N, V_teacher] with the same N, got "
                             f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if not temperature > 0:
        raise LossInputError(f"temperature must be > 0, got {temperature}")
    if reduction not in ("sum", "mean"):
        raise LossInputError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def _reduce(per_row: Tensor, reduction: str) -> Tensor:
    return per_row.sum() if reduction == "sum" else per_row.sum() / max(1, per_row.numel())


def _padded_l1(p: Tensor, q: Tensor) -> Tensor:
    """Per row: L1 distance between two vectors, the shorter padded with zeros."""
    width = max(p.shape[-1], q.shape[-1])
    return (F.pad(p, (0, width - p.shape[-1])) - F.pad(q, (0, width - q.shape[-1]))).abs().sum(-1)


def _descending(p: Tensor) -> Tensor:
    return p.sort(dim=-1, descending=True).values


def sorted_l1(p: Tensor, q: Tensor) -> Tensor:
    """Per row: L1 distance between the descending-sorted probability vectors, the shorter padded with zeros."""
    return _padded_l1(_descending(p), _descending(q))


def uld(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, reduction: str = "sum") -> Tensor:
    """ULD over paired rows (see the module docstring)."""
    _check(student_logits, teacher_logits, temperature, reduction)
    p_s = torch.softmax(upcast(student_logits) / temperature, dim=-1)
    p_t = torch.softmax(upcast(teacher_logits) / temperature, dim=-1)
    return _reduce(sorted_l1(p_s, p_t), reduction)


def cross_vocab_kl(student_logits: Tensor, teacher_logits: Tensor, shared_s: Tensor, shared_t: Tensor,
                   temperature: float = 1.0, reduction: str = "sum") -> Tensor:
    """GOLD's hybrid over paired rows: shared-vocabulary forward KL plus ULD on the rest (see the module
    docstring). shared_s / shared_t: [M] ids of the same token strings in the student's / teacher's vocabulary."""
    _check(student_logits, teacher_logits, temperature, reduction)
    if shared_s.shape != shared_t.shape or shared_s.dim() != 1:
        raise LossInputError(f"shared_s and shared_t must be [M] id lists of one length, got {tuple(shared_s.shape)} "
                             f"and {tuple(shared_t.shape)}")
    s = upcast(student_logits) / temperature
    t = upcast(teacher_logits) / temperature
    shared_s, shared_t = shared_s.to(s.device), shared_t.to(s.device)
    # KL over the shared ids, each side renormalised over them (a log-softmax of the shared logits).
    log_q = torch.log_softmax(s[:, shared_s], dim=-1)
    log_p = torch.log_softmax(t[:, shared_t], dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1) * temperature ** 2
    weight = shared_t.numel() / t.shape[-1]
    if weight == 1.0:
        return _reduce(kl, reduction)
    rest_s = torch.ones(s.shape[-1], dtype=torch.bool, device=s.device)
    rest_s[shared_s] = False
    rest_t = torch.ones(t.shape[-1], dtype=torch.bool, device=s.device)
    rest_t[shared_t] = False
    rest = sorted_l1(torch.softmax(s, dim=-1)[:, rest_s], torch.softmax(t, dim=-1)[:, rest_t])
    return _reduce(weight * kl + (1 - weight) * rest, reduction)


def shared_vocabulary(student_vocab: dict[str, int], teacher_vocab: dict[str, int]) -> tuple[Tensor, Tensor]:
    """(student ids, teacher ids) of the token strings both vocabularies hold, in teacher id order."""
    pairs = sorted((t_id, student_vocab[token]) for token, t_id in teacher_vocab.items() if token in student_vocab)
    return (torch.tensor([s for _, s in pairs], dtype=torch.long),
            torch.tensor([t for t, _ in pairs], dtype=torch.long))


def _check_cached(student_logits: Tensor, teacher_logprobs: Tensor, teacher_tail: Tensor, teacher_vocab: int,
                  temperature: float, cache_temperature: float, tail: str, reduction: str) -> None:
    _check(student_logits, teacher_logprobs, temperature, reduction)
    if teacher_tail.shape != teacher_logprobs.shape[:1]:
        raise LossInputError(f"teacher_tail must be [N] for teacher_logprobs {tuple(teacher_logprobs.shape)}, got "
                             f"{tuple(teacher_tail.shape)}")
    if teacher_logprobs.shape[-1] > teacher_vocab:
        raise LossInputError(f"{teacher_logprobs.shape[-1]} cached ids per row but a teacher vocabulary of "
                             f"{teacher_vocab}")
    if not cache_temperature > 0:
        raise LossInputError(f"cache_temperature must be > 0, got {cache_temperature}")
    if tail not in TAILS:
        raise LossInputError(f"tail must be one of {TAILS}, got {tail!r}")


def _cached_teacher(teacher_logprobs: Tensor, teacher_tail: Tensor, teacher_vocab: int, ratio: float,
                    tail: str) -> tuple[Tensor, Tensor]:
    """(p [N, k], u [N]): the teacher's probabilities at its kept ids and at each of its V_t - k other ids (the
    tail spread evenly; 0 with tail="drop"), re-tempered by ratio = T_cache / T and renormalised."""
    lp = upcast(teacher_logprobs) * ratio  # [N, k]
    rest = teacher_vocab - lp.shape[-1]
    if tail == "drop" or rest == 0:
        return torch.softmax(lp, dim=-1), lp.new_zeros(lp.shape[:1])
    log_u = (upcast(teacher_tail).to(lp.dtype) / rest).log() * ratio  # [N]; -inf where the tail is 0
    log_z = torch.logsumexp(torch.cat([lp, (log_u + math.log(rest))[:, None]], -1), -1)  # [N]
    return (lp - log_z[:, None]).exp(), (log_u - log_z).exp()


def topk_uld(student_logits: Tensor, teacher_logprobs: Tensor, teacher_tail: Tensor, teacher_vocab: int,
             temperature: float = 1.0, cache_temperature: float = 1.0, tail: str = "bucket",
             reduction: str = "sum") -> Tensor:
    """ULD against a cached teacher (see the module docstring). student_logits [N, V_s]; teacher_logprobs [N, k]
    (most likely first); teacher_tail [N] the stored mass outside the kept ids; teacher_vocab V_t."""
    _check_cached(student_logits, teacher_logprobs, teacher_tail, teacher_vocab, temperature, cache_temperature,
                  tail, reduction)
    p, u = _cached_teacher(teacher_logprobs, teacher_tail, teacher_vocab, cache_temperature / temperature, tail)
    # Already descending: the kept probabilities, then the tail's even share (no larger than the smallest kept).
    q = torch.cat([p, u[:, None].expand(-1, teacher_vocab - p.shape[-1])], -1)  # [N, V_t]
    p_s = torch.softmax(upcast(student_logits) / temperature, dim=-1)
    return _reduce(_padded_l1(_descending(p_s), q), reduction)


def topk_cross_vocab_kl(student_logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor, teacher_tail: Tensor,
                        shared_s: Tensor, shared_t: Tensor, teacher_vocab: int, temperature: float = 1.0,
                        cache_temperature: float = 1.0, tail: str = "bucket", reduction: str = "sum") -> Tensor:
    """GOLD's hybrid against a cached teacher (see the module docstring). teacher_ids [N, k] the kept teacher ids,
    teacher_logprobs [N, k] at them; shared_s / shared_t as for `cross_vocab_kl`; the rest as for `topk_uld`."""
    _check_cached(student_logits, teacher_logprobs, teacher_tail, teacher_vocab, temperature, cache_temperature,
                  tail, reduction)
    if teacher_ids.shape != teacher_logprobs.shape:
        raise LossInputError(f"teacher_ids {tuple(teacher_ids.shape)} and teacher_logprobs "
                             f"{tuple(teacher_logprobs.shape)} must have the same shape")
    s = upcast(student_logits) / temperature
    k = teacher_ids.shape[-1]
    v_s, m = s.shape[-1], shared_t.numel()
    p, u = _cached_teacher(teacher_logprobs, teacher_tail, teacher_vocab, cache_temperature / temperature, tail)
    shared_s, shared_t, teacher_ids = shared_s.to(s.device), shared_t.to(s.device), teacher_ids.to(s.device)
    # Each kept teacher id's student id, or v_s (a column that stands for "not shared") when it has none.
    to_student = torch.full((teacher_vocab,), v_s, dtype=torch.long, device=s.device)
    to_student[shared_t] = shared_s
    mapped = to_student[teacher_ids]  # [N, k]
    is_shared = mapped < v_s
    kept_shared = is_shared.sum(-1)  # [N]
    fill = torch.finfo(s.dtype).min  # finite: keeps the gradients finite where a bucket is empty
    in_shared = torch.zeros(v_s + 1, dtype=torch.bool, device=s.device)
    in_shared[shared_s] = True
    log_q = F.pad(torch.log_softmax(s, dim=-1), (0, 1), value=fill)  # [N, V_s + 1]
    lq_kept = log_q.gather(-1, mapped)  # [N, k]
    p_kept = torch.where(is_shared, p, 0.0)
    if tail == "drop":
        teacher = p_kept
        student = lq_kept - torch.logsumexp(lq_kept, -1, keepdim=True)
    else:
        lq_shared = log_q.masked_fill(~in_shared, fill)
        lq_other = torch.logsumexp(lq_shared.scatter(-1, mapped, fill), -1, keepdim=True)  # shared, not kept
        teacher = torch.cat([p_kept, (u * (m - kept_shared))[:, None]], -1)  # [N, k + 1]
        student = torch.cat([lq_kept, lq_other], -1) - torch.logsumexp(lq_shared, -1, keepdim=True)
    teacher = teacher / teacher.sum(-1, keepdim=True).clamp_min(torch.finfo(teacher.dtype).tiny)
    kl = (torch.xlogy(teacher, teacher) - teacher * student).sum(-1) * temperature ** 2
    weight = m / teacher_vocab
    if weight == 1.0:
        return _reduce(kl, reduction)
    # The rest: the student's other ids against the kept non-shared probabilities, then their even tail share.
    width = teacher_vocab - m
    kept_rest = _descending(torch.where(is_shared, -1.0, p))[:, :width]  # non-shared first, descending
    kept_rest = F.pad(kept_rest, (0, width - kept_rest.shape[-1]))
    positions = torch.arange(width, device=s.device)[None]
    q_rest = torch.where(positions < (k - kept_shared)[:, None], kept_rest, u[:, None])  # [N, V_t - M]
    p_rest = _descending(torch.softmax(s, dim=-1)[:, ~in_shared[:v_s]])
    return _reduce(weight * kl + (1 - weight) * _padded_l1(p_rest, q_rest), reduction)
