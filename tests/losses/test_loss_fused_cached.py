"""DistillObjective.fused_cached: the top-k cached objective computed from hidden states + lm_head.

Loss and gradients (hidden states, weight, bias) equal a plain float64 full-logits reference written here from the
definitions (and `cached` on the full logits), for both tails, with and without a stored tail, T != T_cache, padded
labels and chunk sizes that do not divide the token count; no tensor bigger than one [chunk, V] block is made."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lmdistill.losses import DistillObjective, LossConfigError, LossInputError, LossTerm

B, T_LEN, H, V, K = 3, 9, 16, 50, 8
TERMS = [LossTerm("cross_entropy", 0.3), LossTerm("forward_kl", 0.7)]


def _case(seed: int, k: int = K, cache_temperature: float = 1.0, dtype=torch.float64):
    """Student hidden [B, T, H], weight [V, H], bias [V]; a cache of a random teacher: ids / log-probs [B, T, k] at
    T_cache and the tail mass summed over the full distribution [B, T]; labels [B, T] with -100 padding."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T_LEN, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) * 0.5
    bias = torch.randn(V, generator=g, dtype=dtype)
    teacher = torch.randn(B, T_LEN, V, generator=g, dtype=torch.float64) * 3.0
    probs = torch.softmax(teacher / cache_temperature, -1)
    top = probs.topk(k, dim=-1)
    tail = probs.sum(-1) - top.values.sum(-1)
    labels = torch.randint(0, V, (B, T_LEN), generator=g)
    labels[0, :4] = -100
    labels[2, -3:] = -100
    return hidden, weight, bias, top.indices, top.values.log().to(dtype), tail.to(dtype), labels


def _reference_topk(logits, ids, logprobs, stored_tail, temperature, cache_temperature, tail):
    """T^2 top-k KL per position [B, T] in float64, from probabilities: softmax over the full vocabulary, then
    gathered; teacher probs re-tempered p^(Tc/T) and renormalised over the k ids (+ the tail bucket)."""
    q = torch.softmax(logits.double() / temperature, -1)
    q_kept = q.gather(-1, ids)  # [B, T, k]
    power = cache_temperature / temperature
    p_kept = logprobs.double().exp() ** power
    if tail == "drop":
        p, q_b = p_kept / p_kept.sum(-1, keepdim=True), q_kept / q_kept.sum(-1, keepdim=True)
    else:
        rest = stored_tail.double() if stored_tail is not None else (1 - logprobs.double().exp().sum(-1)).clamp_min(0)
        p = torch.cat([p_kept, (rest ** power)[..., None]], -1)
        p = p / p.sum(-1, keepdim=True)
        q_b = torch.cat([q_kept, (1 - q_kept.sum(-1))[..., None]], -1)
    return temperature**2 * (p * (p.log() - q_b.log())).sum(-1)


def _reference(hidden, weight, bias, ids, logprobs, stored_tail, labels, temperature, cache_temperature, tail,
               num_items, softcap=None, scale=1.0):
    """0.3 * CE + 0.7 * top-k KL, sums over counted positions divided by num_items."""
    logits = (hidden.double() @ weight.double().T + bias.double()) * scale
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    mask = labels != -100
    kd = _reference_topk(logits, ids, logprobs, stored_tail, temperature, cache_temperature, tail)[mask].sum()
    ce = -torch.log_softmax(logits, -1)[mask].gather(-1, labels[mask][:, None]).sum()
    return (0.3 * ce + 0.7 * kd) / num_items


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("tail", ["bucket", "drop"])
@pytest.mark.parametrize("stored", [True, False])
@pytest.mark.parametrize("temperature,cache_temperature,chunk_size", [(1.0, 1.0, 5), (2.0, 1.0, 7), (0.5, 2.0, 1)])
def test_fused_cached_equals_full_logits_reference(tail, stored, temperature, cache_temperature, chunk_size):
    hidden, weight, bias, ids, logprobs, stored_tail, labels = _case(11 + chunk_size, cache_temperature=cache_temperature)
    stored_tail = stored_tail if stored else None
    params = [t.requires_grad_(True) for t in (hidden, weight, bias)]
    num_items = int((labels != -100).sum()) + 5  # as if other micro-batches of the accumulated batch counted more
    obj = DistillObjective(TERMS, temperature, chunk_size=chunk_size)  # 27 tokens: chunks of 5, 7, 1
    out = obj.fused_cached(hidden, weight, bias, ids, logprobs, labels, num_items=num_items,
                           cache_temperature=cache_temperature, tail=tail, teacher_tail=stored_tail)
    ref = _reference(hidden, weight, bias, ids, logprobs, stored_tail, labels, temperature, cache_temperature, tail,
                     num_items)
    # float64 throughout; the tolerance is the objective's float32 term weights (0.3, 0.7 rounded), not chunking
    torch.testing.assert_close(out.total, ref, rtol=1e-7, atol=1e-10)
    for ours, theirs in zip(_grads(out.total, params), _grads(ref, params)):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-8)
    # The same numbers as `cached` on the full logits.
    plain = obj.cached(hidden @ weight.T + bias, ids, logprobs, labels, num_items=num_items,
                       cache_temperature=cache_temperature, tail=tail, teacher_tail=stored_tail)
    for name in plain.terms:
        torch.testing.assert_close(out.terms[name], plain.terms[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tail", ["bucket", "drop"])
def test_float32_with_softcap_scale_and_default_chunk(tail):
    """float32 inputs (what training passes), Gemma soft-cap and Cohere scale, the chunk size picked from V."""
    hidden, weight, bias, ids, logprobs, stored_tail, labels = _case(3, dtype=torch.float32)
    params = [t.requires_grad_(True) for t in (hidden, weight, bias)]
    out = DistillObjective(TERMS, 2.0).fused_cached(hidden, weight, bias, ids, logprobs, labels, tail=tail,
                                                    teacher_tail=stored_tail, student_softcap=4.0,
                                                    student_logit_scale=0.5)
    count = int((labels != -100).sum())
    ref = _reference(hidden, weight, bias, ids, logprobs, stored_tail, labels, 2.0, 1.0, tail, count, 4.0, 0.5)
    assert out.total.dtype == torch.float32
    torch.testing.assert_close(out.total.double(), ref, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(_grads(out.total, params), _grads(ref, params)):
        torch.testing.assert_close(ours.double(), theirs.double(), rtol=1e-4, atol=1e-6)


def test_k_equal_v_is_forward_kl_and_terms_backward_alone():
    """k = V: no tail, so the cached objective is the full forward KL. Backward of one term alone (as a balancer
    does) asks for another mix than the forward prepared: the chunks are recomputed with their cache rows."""
    hidden, weight, bias, ids, logprobs, _, labels = _case(5, k=V)
    hidden.requires_grad_(True)
    out = DistillObjective(TERMS, 2.0, chunk_size=4).fused_cached(hidden, weight, bias, ids, logprobs, labels)
    mask = labels != -100
    logits = hidden @ weight.T + bias
    teacher_lp = torch.full_like(logits, 0.0).scatter(-1, ids, logprobs)  # log p at T_cache = 1, every id kept
    p, q = torch.softmax(teacher_lp / 2.0, -1), torch.softmax(logits / 2.0, -1)
    ref_kl = 4.0 * (p * (p.log() - q.log())).sum(-1)[mask].sum() / int(mask.sum())
    torch.testing.assert_close(out.terms["forward_kl"], ref_kl, rtol=1e-10, atol=1e-12)
    (ours,) = torch.autograd.grad(out.terms["forward_kl"], hidden, retain_graph=True)
    (theirs,) = torch.autograd.grad(ref_kl, hidden)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
    (total,) = torch.autograd.grad(out.total, hidden)
    assert total.abs().sum() > 0


def test_only_the_cacheable_terms_and_matching_inputs():
    hidden, weight, bias, ids, logprobs, stored_tail, labels = _case(6)
    with pytest.raises(LossConfigError, match="cached .* supports only forward_kl and cross_entropy, not jsd"):
        DistillObjective([LossTerm("jsd")]).fused_cached(hidden, weight, bias, ids, logprobs, labels)
    with pytest.raises(LossInputError, match="cached teacher ids go up to 49 but the student vocabulary has 40"):
        DistillObjective(TERMS).fused_cached(hidden, weight[:40], bias[:40], ids.clamp_max(V - 1),
                                             logprobs, labels)
    with pytest.raises(LossInputError, match=r"student hidden states / cached ids \(3, 9, 16\)"):
        DistillObjective(TERMS).fused_cached(hidden, weight, bias, ids[:, :5], logprobs[:, :5], labels)
    with pytest.raises(LossInputError, match="teacher_tail .* must be shaped like teacher_ids"):
        DistillObjective(TERMS).fused_cached(hidden, weight, bias, ids, logprobs, labels,
                                             teacher_tail=stored_tail[:, :3])


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_larger_than_one_chunk_of_logits():
    """N = 600 tokens, V = 1000, chunk 32: forward + backward never makes a tensor past [32, V] (nor the weight,
    [V, 16]); `cached` on full logits, for contrast, makes [N, V] ones."""
    n, vocab, hid, chunk = 600, 1000, 16, 32
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(n, hid, generator=g).requires_grad_(True)
    weight = (torch.randn(vocab, hid, generator=g) * 0.5).requires_grad_(True)
    top = torch.randn(n, vocab, generator=g).log_softmax(-1).topk(K, -1)
    labels = torch.randint(0, vocab, (n,), generator=g)
    obj = DistillObjective(TERMS, 2.0, chunk_size=chunk)
    with _LargestTensor() as fused:
        obj.fused_cached(hidden, weight, None, top.indices, top.values, labels).total.backward()
    with _LargestTensor() as plain:
        obj.cached(hidden @ weight.T, top.indices, top.values, labels).total.backward()
    assert fused.largest <= chunk * vocab < n * vocab <= plain.largest
