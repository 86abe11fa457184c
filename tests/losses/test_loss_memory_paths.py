"""Chunked == unchunked and fused == unfused: loss and gradients, with masks, padded vocab, bias, soft-cap,
tied embeddings; and the recompute path taken when backward asks for another mix of terms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from loss_reference import NewTensorsShaped, random_case, reference_loss

from lmdistill.losses import LOGIT_LOSSES, DistillObjective, LossTerm, cross_entropy, fused_distill_loss

PARAMS = {"forward_kl": {}, "reverse_kl": {}, "jsd": {"beta": 0.7}, "skew_kl": {"alpha": 0.2},
          "skew_reverse_kl": {"alpha": 0.2}, "tvd": {}}


@pytest.mark.parametrize("name", PARAMS)
@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_chunked_equals_unchunked(name, chunk_size):
    student, teacher, labels = random_case((3, 13), 97, seed=chunk_size)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    full = LOGIT_LOSSES[name](student, teacher, labels, temperature=2.0, **PARAMS[name])
    chunked = LOGIT_LOSSES[name](student, teacher, labels, temperature=2.0, chunk_size=chunk_size, **PARAMS[name])
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-7)
    g_full = torch.autograd.grad(full, (student, teacher))
    g_chunk = torch.autograd.grad(chunked * 3.0, (student, teacher))  # a scaled backward reuses the stored grads
    for a, b in zip(g_chunk, g_full):
        torch.testing.assert_close(a, 3.0 * b, rtol=1e-5, atol=1e-8)


def test_chunked_without_grad_and_bf16_inputs():
    student, teacher, labels = random_case((2, 9), 64, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(LOGIT_LOSSES["jsd"](student, teacher, labels, chunk_size=4),
                                   LOGIT_LOSSES["jsd"](student, teacher, labels))
    s16 = student.bfloat16().requires_grad_(True)
    loss = LOGIT_LOSSES["forward_kl"](s16, teacher.bfloat16(), labels, chunk_size=4)
    (grad,) = torch.autograd.grad(loss, s16)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    ref = reference_loss("forward_kl", s16.detach().double(), teacher.bfloat16().double(), labels)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


def test_objective_terms_backward_alone_recomputes_exactly():
    """Backward of one term (as a balancer does) differs from the weights the forward prepared for."""
    student, teacher, labels = random_case((2, 11), 50, seed=2)
    student.requires_grad_(True)
    terms = [LossTerm("cross_entropy", 0.2), LossTerm("jsd", 0.8, {"beta": 0.4})]
    chunked = DistillObjective(terms, temperature=2.0, chunk_size=5)(student, teacher, labels)
    full = DistillObjective(terms, temperature=2.0)(student, teacher, labels)
    for name in ("cross_entropy", "jsd"):
        torch.testing.assert_close(chunked.terms[name], full.terms[name])
        (a,) = torch.autograd.grad(chunked.terms[name], student, retain_graph=True)
        (b,) = torch.autograd.grad(full.terms[name], student, retain_graph=True)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    mix = 0.9 * chunked.terms["cross_entropy"] + 5.0 * chunked.terms["jsd"]
    ref = 0.9 * full.terms["cross_entropy"] + 5.0 * full.terms["jsd"]
    torch.testing.assert_close(torch.autograd.grad(mix, student, retain_graph=True)[0],
                               torch.autograd.grad(ref, student, retain_graph=True)[0], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(torch.autograd.grad(chunked.total, student)[0],
                               torch.autograd.grad(full.total, student)[0], rtol=1e-5, atol=1e-8)


def _heads(vocab_s=70, vocab_t=64, hs=16, ht=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(3, 9, hs, generator=g), torch.randn(vocab_s, hs, generator=g) * 0.5,
            torch.randn(vocab_s, generator=g), torch.randn(3, 9, ht, generator=g),
            torch.randn(vocab_t, ht, generator=g) * 0.5, torch.randn(vocab_t, generator=g))


@pytest.mark.parametrize("name", ["forward_kl", "jsd", "skew_reverse_kl", "cross_entropy"])
@pytest.mark.parametrize("softcap,scale", [(None, 1.0), (4.0, 0.5)])
def test_fused_equals_unfused(name, softcap, scale):
    hs, ws, bs, ht, wt, bt = _heads()  # student vocab 70 = teacher 64 + 6 padding rows
    labels = torch.randint(0, 64, (3, 9))
    labels[0, :4] = -100
    for t in (hs, ws, bs):
        t.requires_grad_(True)
    params = PARAMS.get(name, {})
    fused = fused_distill_loss(hs, ws, ht, wt, labels, loss=name, temperature=2.0, chunk_size=5, student_bias=bs,
                               teacher_bias=bt, student_softcap=softcap, student_logit_scale=scale,
                               teacher_softcap=softcap, teacher_logit_scale=scale, **params)

    def logits(h, w, b):
        z = (h @ w.T + b) * scale
        return softcap * torch.tanh(z / softcap) if softcap else z

    if name == "cross_entropy":
        ref = cross_entropy(logits(hs, ws, bs), labels)
    else:
        ref = LOGIT_LOSSES[name](logits(hs, ws, bs), logits(ht, wt, bt), labels, temperature=2.0, **params)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-7)
    for a, b in zip(torch.autograd.grad(fused, (hs, ws, bs)), torch.autograd.grad(ref, (hs, ws, bs))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_fused_with_tied_embeddings_accumulates_both_gradients():
    torch.manual_seed(3)
    embed = torch.nn.Embedding(40, 12)
    ids = torch.randint(0, 40, (2, 6))
    teacher_hidden, teacher_weight = torch.randn(2, 6, 20), torch.randn(40, 20)
    labels = torch.randint(0, 40, (2, 6))

    def run(fused: bool) -> torch.Tensor:
        embed.zero_grad()
        hidden = torch.tanh(embed(ids))  # the lm_head below is the same embedding matrix (tied)
        if fused:
            loss = fused_distill_loss(hidden, embed.weight, teacher_hidden, teacher_weight, labels, chunk_size=4)
        else:
            loss = LOGIT_LOSSES["forward_kl"](hidden @ embed.weight.T, teacher_hidden @ teacher_weight.T, labels)
        loss.backward()
        return embed.weight.grad.clone()

    torch.testing.assert_close(run(True), run(False), rtol=1e-5, atol=1e-7)


def test_objective_fused_matches_objective_on_logits():
    hs, ws, bs, ht, wt, bt = _heads(vocab_s=64)
    labels = torch.randint(0, 64, (3, 9))
    labels[2, 5:] = -100
    hs.requires_grad_(True)
    ws.requires_grad_(True)
    obj = DistillObjective([LossTerm("cross_entropy", 0.3), LossTerm("skew_kl", 0.7)], 2.0, chunk_size=4)
    fused = obj.fused(hs, ws, bs, ht, wt, bt, labels, num_items=40)
    plain = obj(hs @ ws.T + bs, ht @ wt.T + bt, labels, num_items=40)
    torch.testing.assert_close(fused.total, plain.total)
    for a, b in zip(torch.autograd.grad(fused.total, (hs, ws)), torch.autograd.grad(plain.total, (hs, ws))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    ce_only = DistillObjective([LossTerm("cross_entropy")])
    out = ce_only.fused(hs, ws, bs, None, None, None, labels)
    ref = F.cross_entropy((hs @ ws.T + bs).reshape(27, 64), labels.reshape(27), ignore_index=-100)
    torch.testing.assert_close(out.total, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_adds_the_lm_head_gradient_into_one_buffer(dtype):
    """12 chunks, one float32 gradient accumulator for the [V, H] weight (plus one low-precision product buffer):
    no [V, H] tensor per chunk. bf16 inputs match the float32 result within bf16 rounding."""
    vocab, hid = 300, 8
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(48, hid, generator=g).to(dtype).requires_grad_(True)
    weight = (torch.randn(vocab, hid, generator=g) * 0.5).to(dtype).requires_grad_(True)
    t_hidden, t_weight = torch.randn(48, hid, generator=g).to(dtype), torch.randn(vocab, hid, generator=g).to(dtype)
    labels = torch.randint(0, vocab, (48,), generator=g)
    with NewTensorsShaped((vocab, hid)) as counter:
        loss = fused_distill_loss(hidden, weight, t_hidden, t_weight, labels, loss="jsd", chunk_size=4)
        loss.backward()
    assert counter.count <= (1 if dtype == torch.float32 else 3), counter.count
    ref = LOGIT_LOSSES["jsd"](hidden.float() @ weight.float().T, t_hidden.float() @ t_weight.float().T, labels)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(loss.float(), ref, **tol)
    ref_grad = torch.autograd.grad(ref, weight)[0]
    torch.testing.assert_close(weight.grad.float(), ref_grad.float(), **tol)
