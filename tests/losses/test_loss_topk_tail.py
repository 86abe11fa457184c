"""Top-k cached KD with the cache's stored tail mass: the tail bucket is the stored one, not 1 - sum(kept)."""

from __future__ import annotations

import pytest
import torch
from loss_reference import random_case

from lmdistill.losses import DistillObjective, LossInputError, LossTerm, topk_kl

K = 8


def _fp16_cache(teacher: torch.Tensor, cache_temperature: float) -> tuple[torch.Tensor, ...]:
    """What `cache-teacher` stores: top-k ids, their log-probs in fp16, and the tail summed over the full vocabulary."""
    logprobs = torch.log_softmax(teacher.double() / cache_temperature, -1)
    top = logprobs.topk(K, dim=-1)
    tail = 1.0 - top.values.exp().sum(-1)
    return top.indices, top.values.half(), tail.float()


def _reference(student, ids, logprobs, tail, labels, temperature, cache_temperature):
    """T^2 KL over k + 1 buckets in float64, per counted token, summed: teacher buckets exp(lp)^(Tc/T) and
    tail^(Tc/T) renormalised; student buckets its softmax (full vocabulary) at the kept ids and the rest."""
    a = cache_temperature / temperature
    weights = torch.cat([logprobs.double().exp() ** a, tail.double()[..., None] ** a], -1)  # [..., k + 1]
    p = weights / weights.sum(-1, keepdim=True)
    q = torch.softmax(student.double() / temperature, -1)
    q_kept = q.gather(-1, ids)
    q_buckets = torch.cat([q_kept, (1.0 - q_kept.sum(-1))[..., None]], -1)
    per_token = temperature**2 * (p * (p.log() - q_buckets.log())).sum(-1)  # [...]
    return per_token[labels != -100].sum()


@pytest.mark.parametrize("temperature,cache_temperature", [(1.0, 1.0), (2.0, 2.0), (2.0, 1.0)])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_stored_tail_is_the_tail_bucket(temperature, cache_temperature, chunk_size):
    # Peaked teachers leave small tails, where fp16 rounding of k kept log-probs blurs 1 - sum(kept).
    student, teacher, labels = random_case((3, 7), 300, seed=11, scale=6.0)
    ids, logprobs, tail = _fp16_cache(teacher, cache_temperature)
    tail = tail * torch.linspace(0.5, 3.0, tail.numel()).reshape(tail.shape)  # a stored tail 1 - sum cannot give
    count = int((labels != -100).sum())
    student.requires_grad_(True)
    ours = topk_kl(student, ids, logprobs, labels, temperature=temperature, cache_temperature=cache_temperature,
                   teacher_tail=tail, chunk_size=chunk_size)
    ref = _reference(student, ids, logprobs, tail, labels, temperature, cache_temperature) / count
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-7)
    (g_ours,), (g_ref,) = torch.autograd.grad(ours, student), torch.autograd.grad(ref, student)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-7)
    rebuilt = 1.0 - logprobs.double().exp().sum(-1)
    without = _reference(student.detach(), ids, logprobs, rebuilt.clamp_min(0), labels, temperature,
                         cache_temperature) / count
    assert abs(float(ref.detach()) - float(without)) > 1e-3  # the test can tell the stored tail from the rebuilt one


def test_objective_cached_reads_the_stored_tail_over_num_items():
    student, teacher, labels = random_case((2, 9), 120, seed=12, scale=5.0)
    ids, logprobs, tail = _fp16_cache(teacher, 1.0)
    tail = tail * 2.0
    obj = DistillObjective([LossTerm("forward_kl", 0.6), LossTerm("cross_entropy", 0.4)], temperature=2.0,
                           chunk_size=4)
    out = obj.cached(student, ids, logprobs, labels, num_items=40, cache_temperature=1.0, teacher_tail=tail)
    kd = _reference(student, ids, logprobs, tail, labels, 2.0, 1.0) / 40
    torch.testing.assert_close(out.terms["forward_kl"].double(), kd, rtol=1e-5, atol=1e-7)
    # Without a stored tail the objective still rebuilds it from the kept log-probs (older callers, bench).
    rebuilt = obj.cached(student, ids, logprobs, labels, num_items=40, cache_temperature=1.0)
    expected = _reference(student, ids, logprobs, (1.0 - logprobs.double().exp().sum(-1)).clamp_min(0), labels,
                          2.0, 1.0) / 40
    torch.testing.assert_close(rebuilt.terms["forward_kl"].double(), expected, rtol=1e-5, atol=1e-7)


def test_tail_shape_is_checked():
    student, teacher, labels = random_case((2, 4), 50, seed=13)
    ids, logprobs, tail = _fp16_cache(teacher, 1.0)
    with pytest.raises(LossInputError, match=r"teacher_tail \(8,\) must be shaped like teacher_ids without their "
                                             r"last dimension, \(2, 4\)"):
        topk_kl(student, ids, logprobs, labels, teacher_tail=tail.reshape(-1))
