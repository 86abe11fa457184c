"""The top-k (teacher cache) forms of ULD and the shared-vocabulary KL: equal to the live forms when k is the
teacher's vocabulary, and to plain references (the tail spread evenly over the other ids) when k is smaller."""

import math

import pytest
import torch

from lmdistill.losses import LossInputError
from lmdistill.losses.cross_vocab import cross_vocab_kl, topk_cross_vocab_kl, topk_uld, uld

V_S, V_T = 11, 17
# Six token strings both vocabularies hold: student ids 5..10 are teacher ids 1, 3, .., 11.
SHARED_S = torch.tensor([5 + i for i in range(6)])
SHARED_T = torch.tensor([2 * i + 1 for i in range(6)])


def _cache(t_logits, k, cache_temperature):
    """What cache-teacher stores: top-k of log softmax(u / Tc), most likely first, and the mass outside."""
    logprobs = torch.log_softmax(t_logits / cache_temperature, -1)
    top, ids = logprobs.topk(k, -1)
    tail = 1 - top.exp().sum(-1)
    return ids, top, tail.clamp_min(0.0)


def _inputs(seed, n=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, V_S, generator=g, dtype=torch.float64) * 2, \
        torch.randn(n, V_T, generator=g, dtype=torch.float64) * 2


@pytest.mark.parametrize("T, Tc", [(1.0, 1.0), (2.0, 1.0)])
def test_with_k_the_teacher_vocabulary_both_equal_the_live_forms(T, Tc):
    s, t = _inputs(0)
    ids, lps, tail = _cache(t, V_T, Tc)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    got = topk_uld(s1, lps, tail, V_T, T, Tc) + topk_cross_vocab_kl(s1, ids, lps, tail, SHARED_S, SHARED_T, V_T, T,
                                                                    Tc)
    want = uld(s2, t, T) + cross_vocab_kl(s2, t, SHARED_S, SHARED_T, T)
    assert got.item() == pytest.approx(want.item(), rel=1e-9)
    got.backward()
    want.backward()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-9)
    for tail_mode in ("bucket", "drop"):  # nothing outside the top k: the two tails agree
        assert topk_cross_vocab_kl(s, ids, lps, tail, SHARED_S, SHARED_T, V_T, T, Tc, tail_mode).item() == \
            pytest.approx(cross_vocab_kl(s, t, SHARED_S, SHARED_T, T).item(), rel=1e-9)


def _teacher_probs(lps_row, tail, k, ratio, drop):
    """The teacher a cache describes, as a plain list over [kept ids..., the V_T - k others]: kept p^ratio, each
    other tail / (V_T - k) re-tempered alike (or nothing with drop), normalised."""
    kept = [float(x) ** ratio for x in lps_row.exp()]
    others = [] if drop else [(float(tail) / (V_T - k)) ** ratio] * (V_T - k)
    total = sum(kept) + sum(others)
    return [x / total for x in kept], [x / total for x in others]


def _l1_sorted(p, q):
    p, q = sorted(p, reverse=True), sorted(q, reverse=True)
    width = max(len(p), len(q))
    p, q = p + [0.0] * (width - len(p)), q + [0.0] * (width - len(q))
    return sum(abs(x - y) for x, y in zip(p, q))


@pytest.mark.parametrize("T, Tc, tail_mode", [(1.0, 1.0, "bucket"), (2.0, 1.0, "bucket"), (1.0, 1.0, "drop")])
def test_topk_uld_equals_a_plain_reference(T, Tc, tail_mode):
    s, t = _inputs(1)
    k = 5
    _, lps, tail = _cache(t, k, Tc)
    expected = 0.0
    for s_row, lp_row, tail_row in zip(s, lps, tail):
        kept, others = _teacher_probs(lp_row, tail_row, k, Tc / T, tail_mode == "drop")
        expected += _l1_sorted(torch.softmax(s_row / T, -1).tolist(), kept + others)
    assert topk_uld(s, lps, tail, V_T, T, Tc, tail_mode).item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("T, Tc, tail_mode", [(1.0, 1.0, "bucket"), (2.0, 1.0, "bucket"), (1.0, 1.0, "drop")])
def test_topk_cross_vocab_kl_equals_a_plain_reference(T, Tc, tail_mode):
    s, t = _inputs(2)
    k = 7
    ids, lps, tail = _cache(t, k, Tc)
    to_student = dict(zip(SHARED_T.tolist(), SHARED_S.tolist()))
    m, w = len(to_student), len(to_student) / V_T
    expected = 0.0
    for s_row, id_row, lp_row, tail_row in zip(s, ids.tolist(), lps, tail):
        kept, others = _teacher_probs(lp_row, tail_row, k, Tc / T, tail_mode == "drop")
        q = torch.softmax(s_row / T, -1).tolist()
        shared_kept = [(p, to_student[i]) for p, i in zip(kept, id_row) if i in to_student]
        u = others[0] if others else 0.0
        # KL over the shared ids: each kept one, then the other shared ones as one bucket (none with drop)
        p_kl = [p for p, _ in shared_kept]
        q_kl = [q[j] for _, j in shared_kept]
        if tail_mode == "bucket":
            p_kl.append(u * (m - len(shared_kept)))
            q_kl.append(sum(q[j] for j in SHARED_S.tolist() if j not in {j for _, j in shared_kept}))
        kl = 0.0
        if sum(p_kl) > 0:  # (drop, and no shared id kept: no KL part)
            p_kl = [x / sum(p_kl) for x in p_kl]
            q_kl = [x / sum(q_kl) for x in q_kl]
            kl = sum(p * math.log(p / y) for p, y in zip(p_kl, q_kl) if p > 0) * T * T
        # ULD on the rest: the student's other ids, the teacher's kept other ids and their share of the tail
        kept_rest = [p for p, i in zip(kept, id_row) if i not in to_student]
        t_rest = kept_rest + [u] * (V_T - m - len(kept_rest))
        s_rest = [q[j] for j in range(V_S) if j not in SHARED_S.tolist()]
        expected += w * kl + (1 - w) * _l1_sorted(s_rest, t_rest)
    got = topk_cross_vocab_kl(s, ids, lps, tail, SHARED_S, SHARED_T, V_T, T, Tc, tail_mode)
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_gradients_stay_finite_with_empty_buckets():
    s, t = _inputs(3)
    ids, lps, tail = _cache(t, V_T, 1.0)
    s = s.float().requires_grad_()
    for tail_mode in ("bucket", "drop"):
        topk_cross_vocab_kl(s, ids, lps.float(), tail.float(), SHARED_S, SHARED_T, V_T, tail=tail_mode).backward()
        assert torch.isfinite(s.grad).all()


def test_bad_cached_inputs_are_named():
    s, lps, tail = torch.zeros(3, V_S), torch.zeros(3, 4), torch.zeros(3)
    with pytest.raises(LossInputError, match="teacher_tail must be \\[N\\]"):
        topk_uld(s, lps, torch.zeros(2), V_T)
    with pytest.raises(LossInputError, match="4 cached ids per row but a teacher vocabulary of 3"):
        topk_uld(s, lps, tail, 3)
    with pytest.raises(LossInputError, match="tail must be one of"):
        topk_uld(s, lps, tail, V_T, tail="spread")
