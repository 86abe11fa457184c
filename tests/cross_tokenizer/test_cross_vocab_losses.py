"""ULD and the shared-vocabulary KL against plain references on random distributions."""

import pytest
import torch

from lmdistill.losses import LossInputError, forward_kl
from lmdistill.losses.cross_vocab import cross_vocab_kl, shared_vocabulary, uld


def _reference_uld(s_logits, t_logits, T):
    total = 0.0
    for s_row, t_row in zip(s_logits, t_logits):
        p = sorted(torch.softmax(s_row.double() / T, -1).tolist(), reverse=True)
        q = sorted(torch.softmax(t_row.double() / T, -1).tolist(), reverse=True)
        width = max(len(p), len(q))
        p, q = p + [0.0] * (width - len(p)), q + [0.0] * (width - len(q))
        total += sum(abs(x - y) for x, y in zip(p, q))
    return total


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_uld_equals_a_plain_reference(T):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 11, generator=g) * 3, torch.randn(5, 17, generator=g) * 3
    assert uld(s, t, temperature=T).item() == pytest.approx(_reference_uld(s, t, T), rel=1e-5)
    assert uld(s, t, temperature=T, reduction="mean").item() == pytest.approx(_reference_uld(s, t, T) / 5, rel=1e-5)
    assert uld(s, s).item() == pytest.approx(0.0, abs=1e-6)


def test_shared_vocabulary_term_with_identical_vocabularies_is_forward_kl():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 13, generator=g), torch.randn(6, 13, generator=g)
    vocab = {f"tok{i}": i for i in range(13)}
    shared_s, shared_t = shared_vocabulary(vocab, vocab)
    got = cross_vocab_kl(s, t, shared_s, shared_t, temperature=2.0)
    assert got.item() == pytest.approx(forward_kl(s, t, temperature=2.0, reduction="sum").item(), rel=1e-5)


def test_shared_vocabulary_term_is_renormalised_kl_plus_uld_on_the_rest():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 7, generator=g), torch.randn(4, 9, generator=g)
    student = {"a": 0, "b": 1, "c": 2, "x": 3, "y": 4, "z": 5, "w": 6}
    teacher = {"c": 0, "a": 1, "q": 2, "b": 3, "r": 4, "s": 5, "t": 6, "u": 7, "v": 8}
    shared_s, shared_t = shared_vocabulary(student, teacher)
    assert shared_t.tolist() == [0, 1, 3] and shared_s.tolist() == [2, 0, 1]  # c, a, b
    expected = 0.0
    for s_row, t_row in zip(s.double(), t.double()):
        p_all, q_all = torch.softmax(t_row, -1), torch.softmax(s_row, -1)
        p, q = p_all[[0, 1, 3]] / p_all[[0, 1, 3]].sum(), q_all[[2, 0, 1]] / q_all[[2, 0, 1]].sum()
        kl = float((p * (p / q).log()).sum())
        rest = sum(abs(x - y) for x, y in _padded(sorted(q_all[[3, 4, 5, 6]].tolist(), reverse=True),
                                                  sorted(p_all[[2, 4, 5, 6, 7, 8]].tolist(), reverse=True)))
        expected += 3 / 9 * kl + 6 / 9 * rest
    assert cross_vocab_kl(s, t, shared_s, shared_t).item() == pytest.approx(expected, rel=1e-5)


def _padded(p, q):
    width = max(len(p), len(q))
    return zip(p + [0.0] * (width - len(p)), q + [0.0] * (width - len(q)))


def test_paired_rows_must_match():
    with pytest.raises(LossInputError, match="same N"):
        uld(torch.zeros(3, 5), torch.zeros(2, 5))
