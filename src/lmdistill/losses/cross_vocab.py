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

Both return a sum over rows (reduction="sum", the objective divides by its token count) or the mean over rows.
Computation is in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

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


def sorted_l1(p: Tensor, q: Tensor) -> Tensor:
    """Per row: L1 distance between the descending-sorted probability vectors, the shorter padded with zeros."""
    width = max(p.shape[-1], q.shape[-1])
    p = F.pad(p.sort(dim=-1, descending=True).values, (0, width - p.shape[-1]))
    q = F.pad(q.sort(dim=-1, descending=True).values, (0, width - q.shape[-1]))
    return (p - q).abs().sum(-1)


def uld(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, reduction: str = "sum") -> Tensor:
    """ULD over paired rows (see the module docstring)."""
    _check(student_logits, teacher_logits, temperature, reduction)
    p_s = torch.softmax(student_logits.float() / temperature, dim=-1)
    p_t = torch.softmax(teacher_logits.float() / temperature, dim=-1)
    return _reduce(sorted_l1(p_s, p_t), reduction)


def cross_vocab_kl(student_logits: Tensor, teacher_logits: Tensor, shared_s: Tensor, shared_t: Tensor,
                   temperature: float = 1.0, reduction: str = "sum") -> Tensor:
    """GOLD's hybrid over paired rows: shared-vocabulary forward KL plus ULD on the rest (see the module
    docstring). shared_s / shared_t: [M] ids of the same token strings in the student's / teacher's vocabulary."""
    _check(student_logits, teacher_logits, temperature, reduction)
    if shared_s.shape != shared_t.shape or shared_s.dim() != 1:
        raise LossInputError(f"shared_s and shared_t must be [M] id lists of one length, got {tuple(shared_s.shape)} "
                             f"and {tuple(shared_t.shape)}")
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
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
