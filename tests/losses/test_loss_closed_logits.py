"""The full-logits objective with its gradient written out: equal to plain autograd on every divergence, exact for a
backward with other term weights (a balancer, one term alone), and its backward runs no kernels over [N, V]."""

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lmdistill.losses import DistillObjective, LossTerm

TERMS = [LossTerm("forward_kl", 0.3, {}), LossTerm("reverse_kl", 0.2, {}), LossTerm("jsd", 0.2, {"beta": 0.3}),
         LossTerm("skew_kl", 0.1, {"alpha": 0.2}), LossTerm("tvd", 0.1, {}), LossTerm("cross_entropy", 0.1, {})]


def _inputs(n=12, v=40):
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(n, v, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    teacher = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[1, 5]] = -100
    return student, teacher, labels


def _reference(student, teacher, labels, temperature):
    """Each term's sum over the counted rows, by plain autograd, divided by the count."""
    keep = labels != -100
    s, t = student[keep], teacher[keep]
    lq, lp = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    q, p = lq.exp(), lp.exp()
    lm = lambda a, b, w: torch.log(w * a + (1 - w) * b)  # noqa: E731
    kl = lambda a, la, lb: (a * (la - lb)).sum()  # noqa: E731
    m = 0.3 * p + 0.7 * q
    terms = {"forward_kl": kl(p, lp, lq), "reverse_kl": kl(q, lq, lp),
             "jsd": 0.3 * kl(p, lp, m.log()) + 0.7 * kl(q, lq, m.log()), "skew_kl": kl(p, lp, lm(p, q, 0.2)),
             "tvd": 0.5 * (p - q).abs().sum()}
    terms = {k: v * temperature**2 for k, v in terms.items()}
    terms["cross_entropy"] = F.cross_entropy(s, labels[keep], reduction="sum")
    return {k: v / keep.sum() for k, v in terms.items()}


def test_closed_form_equals_autograd_for_the_total_and_for_one_term_alone():
    objective = DistillObjective(TERMS, temperature=2.0)
    student, teacher, labels = _inputs()
    out = objective(student, teacher, labels)
    expected = _reference(student, teacher, labels, 2.0)
    for name, value in expected.items():
        torch.testing.assert_close(out.terms[name].double(), value.detach(), rtol=1e-6, atol=1e-9)
    for backward in ("total", "reverse_kl"):  # the expected combination, then another one (recomputed)
        got = torch.autograd.grad(out.total if backward == "total" else out.terms[backward], student,
                                  retain_graph=True)[0]
        target = sum(t.weight * expected[t.name] for t in TERMS) if backward == "total" else expected[backward]
        want = torch.autograd.grad(target, student, retain_graph=True)[0]
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


class _LogitOps(TorchDispatchMode):
    """Counts ops that produce a tensor of the given shape."""

    def __init__(self, shape) -> None:
        super().__init__()
        self.shape, self.count = shape, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.count += isinstance(out, torch.Tensor) and out.shape == self.shape
        return out


def test_the_backward_hands_over_the_gradient_formed_in_the_forward():
    """No backward kernel per forward op over [N, V] (autograd ran four more): the gradient is already there."""
    student, teacher, labels = _inputs(n=16, v=64)
    loss = DistillObjective([LossTerm("forward_kl", 0.5, {}), LossTerm("cross_entropy", 0.5, {})])(
        student, teacher, labels).total
    with _LogitOps(student.shape) as ops:
        loss.backward()
    assert ops.count <= 2, ops.count  # the handover: the reshape's backward and the accumulation into .grad
