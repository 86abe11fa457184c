"""Terms whose true value is +inf (KL(a || b) with a > 0 = b: reverse KL where the teacher gives a token -inf, forward
KL where the student does, cross-entropy on a -inf label) come out +inf from the written-out gradient's paths (full
logits and fused), as `divergences` (autograd) gives them, so the trainer's non-finite guard skips such a step; finite
terms keep `divergences`' values."""

from __future__ import annotations

import math

import pytest
import torch

from lmdistill.losses.closed_logits import closed_logit_terms
from lmdistill.losses.divergences import TermSpec, score_rows
from lmdistill.losses.fused import LMHead, fused_terms

T = 2.0
SPECS = [TermSpec("cross_entropy")] + [TermSpec(name, T, params) for name, params in [
    ("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.3}), ("jsd", {"beta": 0.0}), ("jsd", {"beta": 1.0}),
    ("skew_kl", {"alpha": 0.2}), ("skew_kl", {"alpha": 0.0}), ("skew_reverse_kl", {"alpha": 0.4}),
    ("skew_reverse_kl", {"alpha": 0.0}), ("tvd", {})]]
# KL(a || b) with a > 0 = b somewhere once each side has -inf logits the other lacks
INFINITE = {"cross_entropy", "forward_kl", "reverse_kl", "jsd/0.0", "jsd/1.0", "skew_kl/0.0", "skew_reverse_kl/0.0"}
N, V = 12, 40


def _key(spec: TermSpec) -> str:
    return "/".join([spec.name, *map(str, spec.params.values())])


def _check(got: torch.Tensor, want: torch.Tensor, expect_inf: bool) -> None:
    """got [terms] against divergences' want [terms]: +inf where it is, equal elsewhere."""
    for spec, g, w in zip(SPECS, got.tolist(), want.tolist(), strict=True):
        assert (w == math.inf) == (expect_inf and _key(spec) in INFINITE), (_key(spec), w)
        if w == math.inf:
            assert g == math.inf, (_key(spec), g)
        else:
            assert g == pytest.approx(w, rel=1e-5, abs=1e-5), _key(spec)


def _holes(g: torch.Generator, shape: tuple[int, ...], share: float) -> torch.Tensor:
    """A random mask of -inf positions that leaves every row at least one finite entry."""
    holes = torch.rand(shape, generator=g) < share
    holes[..., 0] = False
    return holes


@pytest.mark.parametrize("disjoint", [True, False])
def test_logits_path_gives_divergences_values_and_infinities(disjoint):
    """Random logits with -inf entries; disjoint: each side has -inf where the other has mass (+inf terms), else
    both sides share their -inf entries (every term finite)."""
    g = torch.Generator().manual_seed(1 + disjoint)
    student, teacher = torch.randn(N, V, generator=g) * 3, torch.randn(N, V, generator=g) * 3
    s_holes = _holes(g, (N, V), 0.25)
    t_holes = _holes(g, (N, V), 0.25) if disjoint else s_holes
    student, teacher = student.masked_fill(s_holes, -math.inf), teacher.masked_fill(t_holes, -math.inf)
    labels = torch.randint(0, V, (N,), generator=g)
    labels = labels.masked_fill(s_holes.gather(1, labels[:, None])[:, 0], 0)  # labels the student gives mass
    if disjoint:
        labels[0] = int(s_holes[0].nonzero()[0])  # one it gives none: cross-entropy is +inf
    want = score_rows(SPECS, student, teacher, labels)
    student.requires_grad_(True)  # the written-out gradient's path
    got = closed_logit_terms(SPECS, [1.0] * len(SPECS), student, teacher, labels, None)
    _check(got.detach(), want, disjoint)


@pytest.mark.parametrize("disjoint", [True, False])
def test_fused_path_gives_divergences_values_and_infinities(disjoint):
    """-inf logits through lm_head biases (the fused path's only source of them): the student's and the teacher's
    masked rows differ (disjoint) or are the same."""
    g = torch.Generator().manual_seed(3 + disjoint)
    hs, ht = torch.randn(N, 8, generator=g), torch.randn(N, 12, generator=g)
    ws, wt = torch.randn(V, 8, generator=g), torch.randn(V, 12, generator=g)
    bs, bt = torch.zeros(V), torch.zeros(V)
    bs[[3, 9, 17]] = -math.inf
    bt[[5, 11, 17] if disjoint else [3, 9, 17]] = -math.inf
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.isin(labels, torch.tensor([3, 9, 17]))] = 0  # labels the student gives mass
    if disjoint:
        labels[0] = 3  # one it gives none: cross-entropy is +inf
    want = score_rows(SPECS, hs @ ws.T + bs, ht @ wt.T + bt, labels)
    ws.requires_grad_(True)
    got, _ = fused_terms(SPECS, hs, LMHead(ws, bs), ht, LMHead(wt, bt), labels, chunk_size=5)
    _check(got.detach(), want, disjoint)
