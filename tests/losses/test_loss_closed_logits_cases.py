"""The logits path's written-out gradient (`closed_logits.py`) against plain float64 autograd written here, on the
cases the config allows: every divergence and parameter end, temperature, label masks (all-masked too), -inf logits
on either side, several teachers' mixture, term weights changed between forward and backward (balancers, GradNorm's
per-term norms), gradient accumulation, bf16 inputs and autocast; a second derivative is exact on the logits path
and refused in one line on the chunked / fused path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmdistill.losses import DistillObjective, LossInputError, LossTerm
from lmdistill.losses.balance import LossBalancer
from lmdistill.losses.mixture import mixture_logits

N, V = 7, 16


def _kl(a, la, lb):
    """sum a (la - lb), 0 log 0 = 0; the inner where keeps 0 * inf out of the backward too."""
    return (a * torch.where(a > 0, la - lb, 0.0)).sum()


def _log(x):
    return x.clamp_min(1e-300).log()  # a token neither side weighs: finite, and no 0/0 in the backward


def _ref_term(name, params, s, p, labels, temperature):
    """One term's sum over counted rows; s [N, V] student logits, p [N, V] the teacher's probs at the temperature."""
    keep = labels != -100
    s, p = s[keep], p[keep]
    if name == "cross_entropy":
        return F.cross_entropy(s, labels[keep], reduction="sum")
    lq = F.log_softmax(s / temperature, -1)
    q, lp = lq.exp(), _log(p)
    b = params.get("beta", params.get("alpha"))
    if name == "forward_kl" or (name in ("jsd", "skew_kl") and b == 0):
        value = _kl(p, lp, lq)
    elif name == "reverse_kl" or (name == "jsd" and b == 1) or (name == "skew_reverse_kl" and b == 0):
        value = _kl(q, lq, lp)
    elif name == "jsd":
        lm = _log(b * p + (1 - b) * q)
        value = b * _kl(p, lp, lm) + (1 - b) * _kl(q, lq, lm)
    elif name == "skew_kl":
        value = _kl(p, lp, _log(b * p + (1 - b) * q))
    elif name == "skew_reverse_kl":
        value = _kl(q, lq, _log(b * q + (1 - b) * p))
    else:
        value = 0.5 * (p - q).abs().sum()
    return temperature**2 * value


def _reference(terms, student, teacher_probs, labels, temperature, num_items=None):
    """Each term's mean over the counted tokens (num_items: the accumulated batch's count), float64, in the graph."""
    count = max(num_items if num_items is not None else int((labels != -100).sum()), 1)
    return {t.name: _ref_term(t.name, t.params, student, teacher_probs, labels, temperature) / count for t in terms}


def _inputs(seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(N, V, generator=g, dtype=dtype) * 2
    teacher = torch.randn(N, V, generator=g, dtype=dtype) * 2
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[1, 4]] = -100
    return student, teacher, labels


CASES = [("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.0}), ("jsd", {"beta": 0.5}), ("jsd", {"beta": 1.0}),
         ("tvd", {}), ("skew_kl", {"alpha": 0.0}), ("skew_kl", {"alpha": 0.3}), ("skew_reverse_kl", {"alpha": 0.0}),
         ("skew_reverse_kl", {"alpha": 0.4}), ("cross_entropy", {})]
# Where a divergence is +inf: KL(p || q) with p > 0 = q (the student's -inf under forward KL), and the reverse
PLAIN_FORWARD = {("forward_kl", None), ("jsd", 0.0), ("skew_kl", 0.0), ("cross_entropy", None)}
PLAIN_REVERSE = {("reverse_kl", None), ("jsd", 1.0), ("skew_reverse_kl", 0.0)}


@pytest.mark.parametrize("name,params", CASES, ids=[f"{n}{list(p.values())}" for n, p in CASES])
def test_every_term_and_its_gradient_equal_float64_autograd(name, params):
    key = (name, next(iter(params.values()), None))
    for temperature in (1.0, 2.5):
        for inf in ("none", "both", "teacher", "student"):
            if inf == "teacher" and key in PLAIN_REVERSE or inf == "student" and key in PLAIN_FORWARD:
                continue
            student, teacher, labels = _inputs(seed=len(name) + len(inf))
            if inf in ("both", "student"):
                student[:, 3] = -math.inf
                labels[labels == 3] = 0
            if inf in ("both", "teacher"):
                teacher[:, 3 if inf == "both" else 5] = -math.inf
            terms = [LossTerm(name, 0.7, params)]
            leaf = student.clone().requires_grad_(True)
            out = DistillObjective(terms, temperature)(leaf, teacher, labels)
            got = torch.autograd.grad(out.total, leaf)[0]
            ref_leaf = student.clone().requires_grad_(True)
            want = _reference(terms, ref_leaf, torch.softmax(teacher / temperature, -1), labels, temperature)[name]
            torch.testing.assert_close(out.terms[name], want.detach(), rtol=1e-10, atol=1e-12,
                                       msg=f"{inf} T={temperature}")
            torch.testing.assert_close(got, torch.autograd.grad(0.7 * want, ref_leaf)[0], rtol=1e-8, atol=1e-12,
                                       msg=f"{inf} T={temperature}")


ALL = [LossTerm("forward_kl", 0.3), LossTerm("reverse_kl", 0.2), LossTerm("jsd", 0.4, {"beta": 0.7}),
       LossTerm("skew_reverse_kl", 0.2, {"alpha": 0.2}), LossTerm("tvd", 0.1), LossTerm("cross_entropy", 0.5)]


def test_all_masked_rows_give_zero_loss_and_zero_gradient():
    student, teacher, _ = _inputs(seed=1)
    leaf = student.requires_grad_(True)
    out = DistillObjective(ALL, 2.0)(leaf, teacher, torch.full((N,), -100))
    out.total.backward()
    assert float(out.total.detach()) == 0.0 and not leaf.grad.any()


def test_several_teachers_mixture_and_other_term_weights_in_the_backward():
    """The trainer's mixture target (T log p_mix); a backward with other weights (a balancer) and one term alone."""
    student, teacher, labels = _inputs(seed=2)
    other = torch.randn(N, V, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    other[:, 2] = -math.inf  # one teacher gives a token no mass, the other does
    weights, temperature = [0.25, 1.0], 2.0
    leaf = student.clone().requires_grad_(True)
    out = DistillObjective(ALL, temperature)(leaf, mixture_logits([teacher, other], weights, temperature), labels)
    mix = (0.25 * torch.softmax(teacher / temperature, -1) + torch.softmax(other / temperature, -1)) / 1.25
    ref_leaf = student.clone().requires_grad_(True)
    ref = _reference(ALL, ref_leaf, mix, labels, temperature)
    for name, value in ref.items():
        torch.testing.assert_close(out.terms[name], value.detach(), rtol=1e-10, atol=1e-12)
    factors = [3.0, 0.0, 0.5, 1.0, 2.0, 0.1]
    for combination in ([t.weight for t in ALL], factors, [0, 0, 1, 0, 0, 0]):
        got = torch.autograd.grad(sum(f * out.terms[t.name] for f, t in zip(combination, ALL)), leaf,
                                  retain_graph=True)[0]
        want = torch.autograd.grad(sum(f * ref[t.name] for f, t in zip(combination, ALL)), ref_leaf,
                                   retain_graph=True)[0]
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)
    # GradNorm's per-term gradient norms (one backward per term) on the student logits as the shared "parameter"
    norms = LossBalancer("gradnorm").gradient_norms(out.terms, [leaf])
    for t in ALL:
        want = torch.autograd.grad(ref[t.name], ref_leaf, retain_graph=True)[0].norm()
        assert norms[t.name] == pytest.approx(float(want), rel=1e-8)


def test_gradient_accumulation_over_micro_batches_equals_the_whole_batch():
    student, teacher, labels = _inputs(seed=4)
    leaf = student.clone().requires_grad_(True)
    count = int((labels != -100).sum())
    objective = DistillObjective(ALL, 1.5)
    for rows in (slice(0, 3), slice(3, N)):  # each micro-batch divides by the whole batch's count
        objective(leaf[rows], teacher[rows], labels[rows], num_items=count).total.backward()
    ref_leaf = student.clone().requires_grad_(True)
    ref = _reference(ALL, ref_leaf, torch.softmax(teacher / 1.5, -1), labels, 1.5)
    sum(t.weight * ref[t.name] for t in ALL).backward()
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("autocast", [False, True])
def test_bf16_logits_and_autocast(autocast):
    """bf16 logits (a bf16 model) or float32 under bf16 autocast: loss and gradients of the values given, to bf16's
    precision; the gradient comes back in the logits' dtype."""
    student, teacher, labels = _inputs(seed=5, dtype=torch.float32)
    if not autocast:
        student, teacher = student.bfloat16(), teacher.bfloat16()
    leaf = student.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = DistillObjective(ALL, 2.0)(leaf, teacher, labels)
    got = torch.autograd.grad(out.total, leaf)[0]
    assert out.total.dtype == torch.float32 and got.dtype == leaf.dtype
    ref_leaf = student.double().requires_grad_(True)
    ref = _reference(ALL, ref_leaf, torch.softmax(teacher.double() / 2.0, -1), labels, 2.0)
    want = sum(t.weight * ref[t.name] for t in ALL)
    torch.testing.assert_close(out.total.double(), want.detach(), rtol=1e-5, atol=1e-6)
    want_grad = torch.autograd.grad(want, ref_leaf)[0]
    tolerance = 2e-2 if got.dtype == torch.bfloat16 else 1e-5  # bf16 keeps 8 bits of the gradient
    torch.testing.assert_close(got.double(), want_grad, rtol=tolerance, atol=tolerance * float(want_grad.abs().max()))


def test_a_second_derivative_is_exact_on_the_logits_path():
    """create_graph=True (a gradient penalty, a Hessian-vector product) gets a gradient autograd can differentiate:
    before, the written-out gradient had no graph, so the loss's part of a second derivative was silently 0."""
    student, teacher, labels = _inputs(seed=6)
    teacher[:, 4] = -math.inf
    terms = [t for t in ALL if t.name != "reverse_kl"]  # +inf where the teacher is -inf
    hessian_vector = []
    for reference in (False, True):
        leaf = student.clone().requires_grad_(True)
        if reference:
            loss = sum(t.weight * v for t, v in zip(terms, _reference(terms, leaf, torch.softmax(teacher / 2.0, -1),
                                                                       labels, 2.0).values()))
        else:
            loss = DistillObjective(terms, 2.0)(leaf, teacher, labels).total
        grad = torch.autograd.grad(loss + leaf.pow(3).sum(), leaf, create_graph=True)[0]
        hessian_vector.append(torch.autograd.grad(grad.pow(2).sum(), leaf)[0])
    torch.testing.assert_close(*hessian_vector, rtol=1e-6, atol=1e-8)  # the objective keeps weights in float32


def _fused_case():
    g = torch.Generator().manual_seed(7)
    hs, ws = torch.randn(N, 6, generator=g).requires_grad_(True), torch.randn(V, 6, generator=g).requires_grad_(True)
    return hs, ws, torch.randn(N, 6, generator=g), torch.randn(V, 6, generator=g), torch.randint(0, V, (N,), generator=g)


def test_a_second_derivative_of_the_fused_loss_is_refused_in_one_line():
    """Its gradients are formed chunk by chunk without a graph: before, a second derivative came out silently wrong."""
    hs, ws, ht, wt, labels = _fused_case()
    out = DistillObjective(ALL, 2.0, chunk_size=3).fused(hs, ws, None, ht, wt, None, labels)
    with pytest.raises(LossInputError, match=r"first derivatives only.*fused: false, chunk_size: null") as err:
        torch.autograd.grad(out.total + hs.pow(3).sum(), hs, create_graph=True)
    assert "\n" not in str(err.value)


def test_the_fused_loss_runs_under_autocast():
    """float32 hidden states and heads inside a bf16 autocast region (a user's own loop): the chunked head
    gradient came back in bf16 and index_copy_ into the float32 gradient failed."""
    hs, ws, ht, wt, labels = _fused_case()
    results = []
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = DistillObjective(ALL, 2.0, chunk_size=3).fused(hs, ws, None, ht, wt, None, labels)
        results.append([out.total.detach(), *torch.autograd.grad(out.total, (hs, ws))])
    for plain, autocast in zip(*results):
        assert autocast.dtype == plain.dtype
        torch.testing.assert_close(autocast, plain, rtol=0.05, atol=0.05 * float(plain.abs().max()))


def test_on_a_gpu_the_blocks_stay_within_the_fused_budget(monkeypatch):
    """On a GPU the rows went into block_terms all at once: its ten-odd [block, V] buffers then cost ten [N, V]
    tensors, more than autograd kept. Shapes only (the meta device): each block holds at most the fused path's budget."""
    import lmdistill.losses.closed_logits as closed_logits
    from lmdistill.losses.divergences import TermSpec
    from lmdistill.losses.fused import BUDGET_ELEMENTS

    blocks = []

    def shapes_only(specs, coeffs, student, teacher, labels, work, masked=True, out=None):
        blocks.append(student.shape[0])
        return torch.zeros(len(specs), device=student.device), torch.empty_like(student)

    monkeypatch.setattr(closed_logits, "block_terms", shapes_only)
    monkeypatch.setattr(closed_logits, "_any_neg_inf", lambda *logits: False)  # meta tensors hold no values
    n, vocab = 8192, 151_936
    student, teacher = (torch.empty(n, vocab, device="meta") for _ in range(2))
    closed_logits._score([TermSpec("forward_kl")], [1.0], student, teacher, None, None)
    assert sum(blocks) == n and max(blocks) * vocab <= BUDGET_ELEMENTS and len(blocks) < 100, blocks[:3]


def test_a_retained_graph_backs_up_again_into_leaf_logits():
    """Leaf logits, several backwards of one retained graph (and a zero_grad in place between): before, autograd kept
    the handed-over gradient as .grad and added into it, so the third backward failed ("modified by an inplace
    operation")."""
    student, teacher, labels = _inputs(seed=8)
    leaf = student.clone().requires_grad_(True)
    out = DistillObjective(ALL, 2.0)(leaf, teacher, labels)
    once = torch.autograd.grad(out.total, leaf, retain_graph=True)[0]
    for _ in range(3):
        out.total.backward(retain_graph=True)
    torch.testing.assert_close(leaf.grad, 3 * once)
    leaf.grad.zero_()
    out.total.backward()
    torch.testing.assert_close(leaf.grad, once)


def test_a_retained_graph_backs_up_again_into_leaf_hidden_states_on_the_fused_path():
    """As on the logits path: the chunked engine handed its stored gradients over as saved tensors, and the third
    backward of a retained graph failed once autograd had added into them as the leaves' .grad."""
    hs, ws, ht, wt, labels = _fused_case()
    out = DistillObjective(ALL, 2.0, chunk_size=3).fused(hs, ws, None, ht, wt, None, labels)
    once = torch.autograd.grad(out.total, (hs, ws), retain_graph=True)
    for _ in range(3):
        out.total.backward(retain_graph=True)
    for leaf, grad in zip((hs, ws), once):
        torch.testing.assert_close(leaf.grad, 3 * grad)
