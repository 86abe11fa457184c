"""The fused path's written-out gradients (`losses/closed_form.py`): loss and gradients w.r.t. hidden states, lm_head
weight and bias equal a float64 autograd reference written here from the definitions, for every divergence and
cross-entropy, with masked tokens, -inf logits, temperature, bias, soft-cap, padded vocabularies and several teachers;
and the chunks allocate no [chunk, V] tensor of their own."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from loss_reference import NewTensorsShaped, per_token

import lmdistill.losses.closed_logits as closed_logits_module
import lmdistill.losses.fused as fused_module
from lmdistill.losses import DistillObjective, LossTerm, closed_form, fused_distill_loss
from lmdistill.losses.errors import LossInputError

PARAMS = {"forward_kl": {}, "reverse_kl": {}, "jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2},
          "skew_reverse_kl": {"alpha": 0.4}, "tvd": {}, "cross_entropy": {}}
MASKED = [3, 7, 20]  # vocabulary rows neither model may emit (-inf bias)


def _term(name: str, params: dict, student: torch.Tensor, teacher_probs: torch.Tensor, labels: torch.Tensor,
          temperature: float) -> torch.Tensor:
    """Sum over counted tokens of one term, float64: student logits [N, Vs], teacher_probs [N, Vt] at T."""
    keep = labels != -100
    student = student[keep]
    if name == "cross_entropy":
        return -torch.log_softmax(student, -1).gather(1, labels[keep][:, None]).sum()
    # log(p) * T re-tempered at T is p again (renormalised over the shared vocabulary, as the definitions cut it).
    return per_token(name, student, teacher_probs[keep].log() * temperature, temperature, **params).sum()


def _logits(hidden, weight, bias, softcap, scale):
    z = (hidden @ weight.T + (bias if bias is not None else 0)) * scale
    return softcap * torch.tanh(z / softcap) if softcap else z


def _case(seed: int, bias: bool, masked: bool, n_teachers: int = 1):
    """Student: hidden [2, 9, 8], head [70, 8] (+ bias); teachers: hidden [2, 9, 12], heads [64, 12] (the student's
    6 extra rows are padding); labels with 4 uncounted tokens. masked: MASKED rows at -inf in every bias."""
    g = torch.Generator().manual_seed(seed)
    hs, ws = torch.randn(2, 9, 8, generator=g), torch.randn(70, 8, generator=g) * 0.7
    bs = torch.randn(70, generator=g) if bias or masked else None
    teachers = []
    for _ in range(n_teachers):
        ht, wt, bt = torch.randn(2, 9, 12, generator=g), torch.randn(64, 12, generator=g) * 0.7, torch.zeros(64)
        if masked:
            bt[MASKED] = -math.inf
        teachers.append((ht, wt, bt))
    if masked:
        bs[MASKED] = -math.inf
    labels = torch.randint(0, 64, (2, 9), generator=g)
    labels = labels.masked_fill(torch.isin(labels, torch.tensor(MASKED)), 0)  # CE is +inf on a masked label
    labels[0, :4] = -100
    for t in (hs, ws, bs):
        if t is not None:
            t.requires_grad_(True)
    return hs, ws, bs, teachers, labels


def _reference(terms, hs, ws, bs, teachers, mixture, labels, temperature, softcap=None, scale=1.0):
    """sum_i weight_i * term_i, each a mean over counted tokens, and its gradients w.r.t. (hs, ws, bs): float64."""
    leaves = [t.detach().double().requires_grad_(True) if t is not None else None for t in (hs, ws, bs)]
    student = _logits(*leaves, softcap, scale).reshape(-1, ws.shape[0])
    weights = mixture or [1.0]
    teacher_probs = sum(w * torch.softmax(_logits(h.double(), wt.double(), bt.double(), softcap, scale)
                                          / temperature, -1) for w, (h, wt, bt) in zip(weights, teachers))
    teacher_probs = (teacher_probs / sum(weights)).reshape(student.shape[0], -1)
    flat = labels.reshape(-1)
    count = int((flat != -100).sum())
    total = sum(t.weight * _term(t.name, t.params, student, teacher_probs, flat, temperature) for t in terms) / count
    grads = torch.autograd.grad(total, [t for t in leaves if t is not None])
    return total, grads


def _fused(terms, hs, ws, bs, teachers, mixture, labels, temperature, softcap=None, scale=1.0, chunk_size=5):
    objective = DistillObjective(terms, temperature, chunk_size=chunk_size)
    several = mixture is not None
    pick = (lambda i: [t[i] for t in teachers]) if several else (lambda i: teachers[0][i])
    caps = [softcap] * len(teachers) if several else softcap
    scales = [scale] * len(teachers) if several else scale
    out = objective.fused(hs, ws, bs, pick(0), pick(1), pick(2), labels, student_softcap=softcap,
                          teacher_softcap=caps, student_logit_scale=scale, teacher_logit_scale=scales,
                          mixture=mixture)
    return out, torch.autograd.grad(out.total, [t for t in (hs, ws, bs) if t is not None], retain_graph=True)


def _assert_matches(fused, fused_grads, ref, ref_grads):
    assert torch.isfinite(fused.total) and all(torch.isfinite(g).all() for g in fused_grads)
    torch.testing.assert_close(fused.total.double(), ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(fused_grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


CASES = {  # (temperature, bias, masked vocabulary rows, softcap, logit scale)
    "plain": (1.0, False, False, None, 1.0),
    "temperature_bias_masked": (2.0, True, True, None, 1.0),
    "softcap_scale": (0.7, True, False, 3.0, 0.5),
}


@pytest.mark.parametrize("name", PARAMS)
@pytest.mark.parametrize("case", CASES)
def test_every_term_matches_the_float64_reference(name, case):
    temperature, bias, masked, softcap, scale = CASES[case]
    hs, ws, bs, teachers, labels = _case(seed=len(name), bias=bias, masked=masked)
    terms = [LossTerm(name, 1.0, PARAMS[name])]
    fused = _fused(terms, hs, ws, bs, teachers, None, labels, temperature, softcap, scale)
    _assert_matches(*fused, *_reference(terms, hs, ws, bs, teachers, None, labels, temperature, softcap, scale))


@pytest.mark.parametrize("name", [n for n in PARAMS if n != "cross_entropy"])
def test_several_teachers_mixture(name):
    hs, ws, bs, teachers, labels = _case(seed=7, bias=True, masked=True, n_teachers=2)
    terms = [LossTerm(name, 0.8, PARAMS[name]), LossTerm("cross_entropy", 0.2)]
    fused = _fused(terms, hs, ws, bs, teachers, [0.25, 1.0], labels, 2.0)
    _assert_matches(*fused, *_reference(terms, hs, ws, bs, teachers, [0.25, 1.0], labels, 2.0))


@pytest.mark.parametrize("name,params", [("jsd", {"beta": 0.0}), ("jsd", {"beta": 1.0}), ("skew_kl", {"alpha": 0.0}),
                                         ("skew_reverse_kl", {"alpha": 0.0})])
def test_the_ends_of_the_parameter_ranges(name, params):
    """jsd's beta 0 / 1 are forward / reverse KL (TRL's mapping), skew alpha 0 the plain KL."""
    hs, ws, bs, teachers, labels = _case(seed=11, bias=False, masked=False)
    plain = {("jsd", 0.0): "forward_kl", ("jsd", 1.0): "reverse_kl", ("skew_kl", 0.0): "forward_kl",
             ("skew_reverse_kl", 0.0): "reverse_kl"}[name, next(iter(params.values()))]
    fused = _fused([LossTerm(name, 1.0, params)], hs, ws, bs, teachers, None, labels, 1.5)
    _assert_matches(*fused, *_reference([LossTerm(plain)], hs, ws, bs, teachers, None, labels, 1.5))


def test_every_term_at_once_and_each_term_backward_alone():
    """All seven terms with their weights in one pass; a backward of one term (as a loss balancer does) recomputes
    that term's gradient in closed form."""
    hs, ws, bs, teachers, labels = _case(seed=13, bias=True, masked=True)
    terms = [LossTerm(name, 0.5 + i, PARAMS[name]) for i, name in enumerate(PARAMS)]
    fused, grads = _fused(terms, hs, ws, bs, teachers, None, labels, 2.0, chunk_size=4)
    _assert_matches(fused, grads, *_reference(terms, hs, ws, bs, teachers, None, labels, 2.0))
    for term in (terms[2], terms[-1]):
        alone = torch.autograd.grad(fused.terms[term.name], (hs, ws, bs), retain_graph=True)
        ref = _reference([LossTerm(term.name, 1.0, term.params)], hs, ws, bs, teachers, None, labels, 2.0)[1]
        for got, want in zip(alone, ref, strict=True):
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["jsd", "skew_reverse_kl"])
def test_chunks_reuse_their_buffers(name):
    """Twice the chunks, the same number of new [chunk, V] tensors: every chunk reuses the buffers of the first
    (autograd would allocate its intermediates and their gradients again for each chunk)."""
    g = torch.Generator().manual_seed(17)
    hidden, weight = torch.randn(48, 8, generator=g).requires_grad_(True), torch.randn(300, 8, generator=g)
    t_hidden, t_weight = torch.randn(48, 8, generator=g), torch.randn(300, 8, generator=g)
    weight.requires_grad_(True)
    counts = []
    for n in (24, 48):
        with NewTensorsShaped((4, 300)) as counter:
            loss = fused_distill_loss(hidden[:n], weight, t_hidden[:n], t_weight, None, loss=name, chunk_size=4,
                                      **PARAMS[name])
            loss.backward()
        counts.append(counter.count)
    assert counts[0] == counts[1] < 20, counts


@pytest.fixture
def two_threads(monkeypatch):
    """Two torch threads and blocks of 2 rows at V = 70, so the loss's rows span several blocks per thread."""
    monkeypatch.setattr(closed_form, "ROW_BLOCK_ELEMENTS", 2 * 70)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _on_logits(terms, hs, ws, bs, teachers, labels, temperature):
    """The full-logits path on the same case: autograd from the logits back to (hs, ws, bs)."""
    ht, wt, bt = teachers[0]
    out = DistillObjective(terms, temperature)(hs @ ws.T + bs, (ht @ wt.T + bt).detach(), labels)
    return out, torch.autograd.grad(out.total, [hs, ws, bs], retain_graph=True)


@pytest.mark.parametrize("path", ["fused", "logits"])
def test_blocks_split_over_the_threads_torch_uses(two_threads, monkeypatch, path):
    """On two threads the counted rows are cut into two ranges, each walked by its own Python thread that runs its
    ops on one thread (split per op over OpenMP threads, the blocks stalled on a busy machine). Every counted row is
    scored once, the caller's thread count is back afterwards, the result equals the float64 reference, and a second
    run gives the same bits (the sums are added in row order, not in the order the threads finish)."""
    hs, ws, bs, teachers, labels = _case(seed=19, bias=True, masked=True)
    terms = [LossTerm(name, 0.5 + i, PARAMS[name]) for i, name in enumerate(PARAMS)]
    calls = []

    def spy(specs, coeffs, student, *args, **kwargs):
        calls.append((threading.get_ident(), torch.get_num_threads(), student.shape[0]))
        return closed_form.block_terms(specs, coeffs, student, *args, **kwargs)

    monkeypatch.setattr(fused_module if path == "fused" else closed_logits_module, "block_terms", spy)
    run = (lambda: _fused(terms, hs, ws, bs, teachers, None, labels, 2.0)) if path == "fused" else (
        lambda: _on_logits(terms, hs, ws, bs, teachers, labels, 2.0))
    first = run()
    assert torch.get_num_threads() == 2
    # each call's second range runs on a pool thread (a new one per call): blocks on and off the caller's thread
    assert {ident == threading.get_ident() for ident, _, _ in calls} == {True, False}
    assert {threads for _, threads, _ in calls} == {1}
    assert sum(rows for _, _, rows in calls) == int((labels != -100).sum())
    _assert_matches(*first, *_reference(terms, hs, ws, bs, teachers, None, labels, 2.0))
    second = run()
    assert torch.equal(first[0].total, second[0].total)
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1], strict=True))


def test_an_error_in_another_thread_reaches_the_caller(two_threads, monkeypatch):
    main = threading.get_ident()

    def fails_off_the_main_thread(*args, **kwargs):
        if threading.get_ident() != main:
            raise LossInputError("raised in the second thread")
        return closed_form.block_terms(*args, **kwargs)

    monkeypatch.setattr(fused_module, "block_terms", fails_off_the_main_thread)
    hs, ws, bs, teachers, labels = _case(seed=19, bias=True, masked=False)
    with pytest.raises(LossInputError, match="raised in the second thread"):
        _fused([LossTerm("jsd", 1.0, PARAMS["jsd"])], hs, ws, bs, teachers, None, labels, 2.0)
    assert torch.get_num_threads() == 2


def test_a_teacher_that_needs_gradients_gets_them_through_autograd():
    """The written-out gradient is the student's only: when a teacher's head or hidden states ask for gradients, the
    chunks run autograd and both sides' gradients equal the reference."""
    hs, ws, bs, teachers, labels = _case(seed=23, bias=True, masked=False)
    ht, wt, bt = teachers[0]
    wt.requires_grad_(True)
    ht.requires_grad_(True)
    fused = fused_distill_loss(hs, ws, ht, wt, labels, loss="jsd", temperature=2.0, student_bias=bs, teacher_bias=bt,
                               chunk_size=5, **PARAMS["jsd"])
    student = (hs @ ws.T + bs).double()
    teacher = (ht @ wt.T + bt).double()
    ref = _term("jsd", PARAMS["jsd"], student.reshape(18, -1), torch.softmax(teacher / 2.0, -1).reshape(18, -1),
                labels.reshape(-1), 2.0) / int((labels != -100).sum())
    torch.testing.assert_close(fused.double(), ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(torch.autograd.grad(fused, (hs, ws, ht, wt)), torch.autograd.grad(ref, (hs, ws, ht, wt))):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-6)
