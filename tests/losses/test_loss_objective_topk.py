"""Top-k cached KD and the objective: weights, num_items, accumulation, validation, the seed-002 form."""

from __future__ import annotations

import pytest
import torch
from loss_reference import random_case, reference_ce, reference_loss

from lmdistill.losses import (DistillObjective, LossConfigError, LossTerm, cross_entropy, forward_kl,
                              topk_kl)


def _cache(teacher: torch.Tensor, k: int, cache_temperature: float):
    """What a teacher cache stores: the k most likely ids and their log-probs at T_cache."""
    logprobs = torch.log_softmax(teacher.double() / cache_temperature, -1)
    top = logprobs.topk(k, dim=-1)
    return top.indices, top.values.float()


@pytest.mark.parametrize("tail", ["bucket", "drop"])
@pytest.mark.parametrize("temperature,cache_temperature", [(1.0, 1.0), (2.0, 1.0), (0.5, 2.0)])
def test_topk_with_k_equal_v_is_forward_kl(tail, temperature, cache_temperature):
    student, teacher, labels = random_case((3, 7), 200, seed=4)
    ids, logprobs = _cache(teacher, 200, cache_temperature)
    student.requires_grad_(True)
    ours = topk_kl(student, ids, logprobs, labels, temperature=temperature, cache_temperature=cache_temperature,
                   tail=tail, chunk_size=6)
    ref = reference_loss("forward_kl", student.detach(), teacher, labels, temperature)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    full = forward_kl(student, teacher, labels, temperature=temperature)
    torch.testing.assert_close(torch.autograd.grad(ours, student)[0], torch.autograd.grad(full, student)[0],
                               rtol=1e-4, atol=1e-7)


def test_topk_error_for_small_k_is_reported_and_bounded():
    """Relative error of top-k KD vs full KD on peaked (LM-like) teachers. With tail='bucket' at T = T_cache
    the bucketed KL never exceeds the full KL (data processing), and the error shrinks as k grows."""
    student, teacher, labels = random_case((4, 16), 2048, seed=5, scale=4.0)
    full = float(forward_kl(student, teacher, labels))
    rows = []
    for k in (8, 32, 128, 512):
        ids, logprobs = _cache(teacher, k, 1.0)
        bucket = float(topk_kl(student, ids, logprobs, labels, tail="bucket"))
        drop = float(topk_kl(student, ids, logprobs, labels, tail="drop"))
        assert bucket <= full + 1e-5
        rows.append((k, abs(bucket - full) / full, abs(drop - full) / full))
    print("\nk     rel.err bucket  rel.err drop   (V=2048, logits*4)")
    for k, eb, ed in rows:
        print(f"{k:<5} {eb:>13.4f}  {ed:>12.4f}")
    errors = [eb for _, eb, _ in rows]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.05


def test_objective_is_weighted_sum_over_num_items():
    student, teacher, labels = random_case((2, 10), 60, seed=6)
    obj = DistillObjective([LossTerm("cross_entropy", 0.25), LossTerm("jsd", 0.75, {"beta": 0.2})], temperature=2.0)
    out = obj(student, teacher, labels, num_items=50)
    count = int((labels != -100).sum())
    ce = reference_ce(student, labels) * count / 50
    kd = reference_loss("jsd", student, teacher, labels, 2.0, reduction="sum", beta=0.2) / 50
    torch.testing.assert_close(out.terms["cross_entropy"].double(), ce, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.terms["jsd"].double(), kd, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.total.double(), 0.25 * ce + 0.75 * kd, rtol=1e-5, atol=1e-7)
    assert obj.needs_teacher and not DistillObjective([LossTerm("cross_entropy")]).needs_teacher


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_accumulated_micro_batches_equal_one_big_batch(chunk_size):
    student, teacher, labels = random_case((4, 9), 40, seed=7, masked=0.5)
    labels[0] = -100  # micro-batches with very different counts: per-batch means would be wrong
    student.requires_grad_(True)
    obj = DistillObjective.seed_form(alpha=0.4, kd="reverse_kl", temperature=2.0, chunk_size=chunk_size)
    big = obj(student, teacher, labels)
    (g_big,) = torch.autograd.grad(big.total, student)
    num_items = int((labels != -100).sum())
    total = sum(obj(student[i:i + 2], teacher[i:i + 2], labels[i:i + 2], num_items=num_items).total for i in (0, 2))
    (g_acc,) = torch.autograd.grad(total, student)
    torch.testing.assert_close(total, big.total)
    torch.testing.assert_close(g_acc, g_big, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_no_counted_row_gives_zero_terms(requires_grad):
    """A micro-batch with no counted label (under several processes, a round of filler rows): the student's logits
    at no position, [0, V], against the teacher's or a cache at none, give zero terms, not a reshape error."""
    objective = DistillObjective([LossTerm("forward_kl", 0.5), LossTerm("cross_entropy", 0.5)])
    student, labels = torch.zeros(0, 16, requires_grad=requires_grad), torch.zeros(0, dtype=torch.long)
    live = objective(student, torch.zeros(0, 16), labels, num_items=5)
    cached = objective.cached(student, torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4), labels, num_items=5)
    assert live.total.item() == 0 and cached.total.item() == 0


def test_seed_form_is_alpha_ce_plus_one_minus_alpha_kd():
    student, teacher, labels = random_case((2, 5), 30, seed=8)
    out = DistillObjective.seed_form(alpha=0.3, temperature=4.0)(student, teacher, labels)
    expected = 0.3 * cross_entropy(student, labels) + 0.7 * forward_kl(student, teacher, labels, temperature=4.0)
    torch.testing.assert_close(out.total, expected)


def test_cached_objective_uses_topk_and_student_ce():
    student, teacher, labels = random_case((2, 6), 50, seed=9)
    ids, logprobs = _cache(teacher, 50, 1.0)
    obj = DistillObjective.seed_form(alpha=0.5, temperature=2.0, chunk_size=4)
    cached = obj.cached(student, ids, logprobs, labels)
    live = obj(student, teacher, labels)
    torch.testing.assert_close(cached.total, live.total, rtol=1e-5, atol=1e-6)
    with pytest.raises(LossConfigError, match="cached .* supports only forward_kl and cross_entropy, not jsd"):
        DistillObjective([LossTerm("jsd")]).cached(student, ids, logprobs, labels)


def test_objective_validates_at_construction():
    with pytest.raises(LossConfigError, match="unknown logit loss 'kl'; choose one of forward_kl"):
        LossTerm("kl")
    with pytest.raises(LossConfigError, match="loss 'jsd': unknown parameter.* alpha; accepted: beta"):
        LossTerm("jsd", 1.0, {"alpha": 0.1})
    with pytest.raises(LossConfigError, match="loss 'skew_kl': alpha=1.0 is outside"):
        LossTerm.from_dict({"name": "skew_kl", "alpha": 1.0})
    with pytest.raises(LossConfigError, match="weight must be a finite number >= 0"):
        LossTerm("tvd", -1.0)
    with pytest.raises(LossConfigError, match="loss names repeat"):
        DistillObjective([LossTerm("tvd"), LossTerm("tvd", 0.5)])
    with pytest.raises(ValueError, match="no loss terms"):  # LossConfigError is a ValueError too
        DistillObjective([])
    with pytest.raises(LossConfigError, match="need the teacher's outputs"):
        DistillObjective([LossTerm("jsd")])(torch.randn(2, 5), None, None)
    assert LossTerm.from_dict({"name": "jsd", "weight": 0.7, "beta": 0.5}) == LossTerm("jsd", 0.7, {"beta": 0.5})
