"""Logits holding -inf (masked vocabulary rows, a top-k filtered teacher): every divergence, on every path (plain,
chunked, fused, objective, cached), against a float64 reference that sums only where the weighting side has mass
(0 log 0 = 0)."""

from __future__ import annotations

import math

import pytest
import torch
from loss_reference import random_case

from lmdistill.losses import LOGIT_LOSSES, DistillObjective, LossTerm, fused_distill_loss, topk_kl

PARAMS = {"forward_kl": {}, "reverse_kl": {}, "jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2},
          "skew_reverse_kl": {"alpha": 0.4}, "tvd": {}}
T = 2.0
MASKED_ROWS = [3, 7, 8, 20]  # vocabulary rows neither model may emit


def _kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    keep = a > 0  # 0 log 0 = 0: only tokens a gives mass enter
    return (a[keep] * (a[keep].log() - b[keep].log())).sum()


def _reference(name, student, teacher, labels) -> torch.Tensor:
    """T^2 x the divergence, mean over counted tokens, one token at a time in float64."""
    q_all = torch.softmax(student.double() / T, -1).reshape(-1, student.shape[-1])
    p_all = torch.softmax(teacher.double() / T, -1).reshape(-1, teacher.shape[-1])
    values = []
    for q, p, label in zip(q_all, p_all, labels.reshape(-1)):
        if label == -100:
            continue
        if name == "forward_kl":
            values.append(_kl(p, q))
        elif name == "reverse_kl":
            values.append(_kl(q, p))
        elif name == "jsd":
            b = PARAMS[name]["beta"]
            m = b * p + (1 - b) * q
            values.append(b * _kl(p, m) + (1 - b) * _kl(q, m))
        elif name == "skew_kl":
            a = PARAMS[name]["alpha"]
            values.append(_kl(p, a * p + (1 - a) * q))
        elif name == "skew_reverse_kl":
            a = PARAMS[name]["alpha"]
            values.append(_kl(q, a * q + (1 - a) * p))
        else:
            values.append(0.5 * (p - q).abs().sum())
    return T * T * torch.stack(values).mean()


def _masked_case(seed: int, top_k: int | None = None):
    """Student and teacher logits [2, 6, 32] with MASKED_ROWS at -inf in both; top_k: the teacher also keeps only
    its k best logits per token (the rest -inf), as a top-k filtered teacher does."""
    student, teacher, labels = random_case((2, 6), 32, seed=seed)
    student[..., MASKED_ROWS] = -math.inf
    teacher[..., MASKED_ROWS] = -math.inf
    if top_k is not None:
        kth = teacher.topk(top_k, dim=-1).values[..., -1:]
        teacher = teacher.masked_fill(teacher < kth, -math.inf)
    return student, teacher, labels


def _check(loss, grad, ref, ref_grad):
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-7)


def _check_loss_against_reference(name, chunk_size, student, teacher, labels) -> torch.Tensor:
    """The loss `name` and its gradient match the float64 reference; returns the gradient."""
    ref_student = student.double().requires_grad_(True)
    ref = _reference(name, ref_student, teacher, labels)
    (ref_grad,) = torch.autograd.grad(ref, ref_student)
    student.requires_grad_(True)
    loss = LOGIT_LOSSES[name](student, teacher, labels, temperature=T, chunk_size=chunk_size, **PARAMS[name])
    (grad,) = torch.autograd.grad(loss, student)
    _check(loss, grad, ref, ref_grad)
    return grad


@pytest.mark.parametrize("name", PARAMS)
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_masked_vocabulary_rows_give_finite_values_and_gradients(name, chunk_size):
    grad = _check_loss_against_reference(name, chunk_size, *_masked_case(seed=1))
    assert not grad[..., MASKED_ROWS].any()


@pytest.mark.parametrize("name", [n for n in PARAMS if n != "reverse_kl"])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_topk_filtered_teacher_gives_finite_values_and_gradients(name, chunk_size):
    _check_loss_against_reference(name, chunk_size, *_masked_case(seed=2, top_k=5))


def test_reverse_kl_is_infinite_only_where_the_student_has_mass_the_teacher_lacks():
    student, teacher, labels = _masked_case(seed=3, top_k=5)
    assert LOGIT_LOSSES["reverse_kl"](student, teacher, labels, temperature=T) == math.inf
    # The student too keeps only the teacher's support: q > 0 = p nowhere, so the value is finite and exact.
    student = student.masked_fill(teacher == -math.inf, -math.inf)
    loss = LOGIT_LOSSES["reverse_kl"](student, teacher, labels, temperature=T)
    torch.testing.assert_close(loss.double(), _reference("reverse_kl", student, teacher, labels))


def test_objective_and_fused_paths_with_masked_rows():
    """Masked rows through an lm_head bias of -inf (both models): fused equals the objective on the full logits,
    which equals the reference; every term at once, chunked."""
    g = torch.Generator().manual_seed(4)
    hidden_s, hidden_t = torch.randn(2, 6, 8, generator=g), torch.randn(2, 6, 12, generator=g)
    w_s, w_t = torch.randn(32, 8, generator=g), torch.randn(32, 12, generator=g)
    bias = torch.zeros(32)
    bias[MASKED_ROWS] = -math.inf
    labels = torch.randint(0, 32, (2, 6), generator=g)
    labels[0, :2] = -100
    terms = [LossTerm(name, 0.5 + i, PARAMS[name]) for i, name in enumerate(PARAMS)]
    objective = DistillObjective(terms, temperature=T, chunk_size=4)
    w_s.requires_grad_(True)
    fused = objective.fused(hidden_s, w_s, bias, hidden_t, w_t, bias, labels)
    (g_fused,) = torch.autograd.grad(fused.total, w_s)
    logits = hidden_s @ w_s.T + bias
    plain = objective(logits, hidden_t @ w_t.T + bias, labels)
    (g_plain,) = torch.autograd.grad(plain.total, w_s)
    assert torch.isfinite(fused.total) and torch.isfinite(g_fused).all()
    torch.testing.assert_close(fused.total, plain.total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_fused, g_plain, rtol=1e-4, atol=1e-6)
    ref = sum(t.weight * _reference(t.name, logits.detach(), hidden_t @ w_t.T + bias, labels) for t in terms)
    torch.testing.assert_close(plain.total.double(), ref, rtol=1e-5, atol=1e-6)
    one = fused_distill_loss(hidden_s, w_s, hidden_t, w_t, labels, loss="jsd", temperature=T, student_bias=bias,
                             teacher_bias=bias, chunk_size=3, beta=PARAMS["jsd"]["beta"])
    torch.testing.assert_close(one, plain.terms["jsd"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tail", ["bucket", "drop"])
def test_cached_teacher_with_masked_entries(tail):
    """A top-k cache whose kept log-probs include -inf (a filtered teacher), against a student with masked rows:
    equals forward KL on the full logits (k = V) and stays finite with finite gradients (k < V)."""
    student, teacher, labels = _masked_case(seed=5, top_k=5)
    teacher_lp = torch.log_softmax(teacher, -1)  # cache_temperature 1
    ids = teacher_lp.argsort(-1, descending=True)
    kept = teacher_lp.gather(-1, ids)
    student.requires_grad_(True)
    full = topk_kl(student, ids, kept, labels, temperature=T, tail=tail, chunk_size=4)
    (grad,) = torch.autograd.grad(full, student)
    ref_student = student.detach().double().requires_grad_(True)
    ref = _reference("forward_kl", ref_student, teacher, labels)
    (ref_grad,) = torch.autograd.grad(ref, ref_student)
    _check(full, grad, ref, ref_grad)
    short = topk_kl(student, ids[..., :8], kept[..., :8], labels, temperature=T, tail=tail)
    (grad,) = torch.autograd.grad(short, student)
    assert torch.isfinite(short) and torch.isfinite(grad).all()


def test_fused_cached_with_masked_rows_equals_cached():
    """A student lm_head whose bias masks rows (-inf) against a top-k cache holding -inf log-probs: the fused path
    gives the logits path's value and weight gradient, finite."""
    g = torch.Generator().manual_seed(6)
    hidden, weight = torch.randn(2, 6, 8, generator=g), torch.randn(32, 8, generator=g)
    bias = torch.zeros(32)
    bias[MASKED_ROWS] = -math.inf
    _, teacher, labels = _masked_case(seed=6, top_k=5)
    labels = labels.masked_fill(torch.isin(labels, torch.tensor(MASKED_ROWS)), 0)  # CE is +inf on a masked label
    teacher_lp = torch.log_softmax(teacher, -1)
    ids = teacher_lp.argsort(-1, descending=True)[..., :8]
    kept = teacher_lp.gather(-1, ids)
    objective = DistillObjective([LossTerm("forward_kl", 0.8), LossTerm("cross_entropy", 0.2)], temperature=T,
                                 chunk_size=4)
    weight.requires_grad_(True)
    fused = objective.fused_cached(hidden, weight, bias, ids, kept, labels)
    (g_fused,) = torch.autograd.grad(fused.total, weight)
    plain = objective.cached(hidden @ weight.T + bias, ids, kept, labels)
    (g_plain,) = torch.autograd.grad(plain.total, weight)
    assert torch.isfinite(fused.total) and torch.isfinite(g_fused).all()
    torch.testing.assert_close(fused.total, plain.total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_fused, g_plain, rtol=1e-4, atol=1e-6)
