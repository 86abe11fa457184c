"""Each logit loss against the float64 reference: values, gradients, masks, reductions, limiting cases."""

from __future__ import annotations

import pytest
import torch
from loss_reference import random_case, reference_ce, reference_loss, trl_generalized_jsd_loss

from lmdistill.losses import (LOGIT_LOSSES, LossConfigError, LossInputError, cross_entropy, forward_kl, jsd,
                              reverse_kl)

DIVERGENCES = {
    "forward_kl": {},
    "reverse_kl": {},
    "jsd": {"beta": 0.3},
    "skew_kl": {"alpha": 0.1},
    "skew_reverse_kl": {"alpha": 0.4},
    "tvd": {},
}
# (shape, vocab, temperature): every T on the small case, the extremes on the larger vocabularies.
CASES = [((3, 17), 64, t) for t in (0.5, 1.0, 2.0, 4.0)] + [((2, 5), 4096, 0.5), ((2, 5), 4096, 2.0),
                                                             ((40,), 1000, 4.0)]


def _call(name, student, teacher, labels, **kw):
    return LOGIT_LOSSES[name](student, teacher, labels, **DIVERGENCES[name], **kw)


@pytest.mark.parametrize("shape,vocab,temperature", CASES)
@pytest.mark.parametrize("name", DIVERGENCES)
def test_value_and_gradient_match_float64_reference(name, shape, vocab, temperature):
    student, teacher, labels = random_case(shape, vocab, seed=vocab + int(10 * temperature) + len(name))
    ref_student = student.double().requires_grad_(True)
    ref = reference_loss(name, ref_student, teacher, labels, temperature, **DIVERGENCES[name])
    (ref_grad,) = torch.autograd.grad(ref, ref_student)
    # float64 input: our code runs in float64, so value and gradient must match to rounding.
    ours64 = _call(name, ref_student, teacher.double(), labels, temperature=temperature)
    (grad64,) = torch.autograd.grad(ours64, ref_student)
    torch.testing.assert_close(ours64, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad64, ref_grad, rtol=1e-9, atol=1e-14)
    # float32 input (the real case): value to 1e-5 relative; gradient entries to float32 precision: log-probs
    # near -80 (T = 0.5, V = 4k) carry ~5e-6 absolute error, which is up to ~5e-4 of JSD's small gradients.
    student.requires_grad_(True)
    ours = _call(name, student, teacher, labels, temperature=temperature)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-7)
    (grad,) = torch.autograd.grad(ours, student)
    scale = ref_grad.abs().max()
    torch.testing.assert_close(grad.double() / scale, ref_grad / scale, rtol=0, atol=1e-3)


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_gradcheck_student_and_teacher(name, chunk_size):
    student, teacher, labels = random_case((2, 3), 6, seed=3)
    student = student.double().requires_grad_(True)
    teacher = teacher.double().requires_grad_(True)

    def f(s, t):
        return _call(name, s, t, labels, temperature=2.0, chunk_size=chunk_size)

    assert torch.autograd.gradcheck(f, (student, teacher), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_masked_positions_change_nothing(name):
    student, teacher, labels = random_case((3, 11), 50, seed=5, masked=0.5)
    student.requires_grad_(True)
    base = _call(name, student, teacher, labels, temperature=2.0)
    (base_grad,) = torch.autograd.grad(base, student)
    masked = labels == -100
    student2, teacher2 = student.detach().clone(), teacher.clone()
    student2[masked] = float("nan")  # a masked row may hold anything, even NaN
    teacher2[masked] = 1e4
    student2.requires_grad_(True)
    for chunk_size in (None, 4):
        again = _call(name, student2, teacher2, labels, temperature=2.0, chunk_size=chunk_size)
        (grad,) = torch.autograd.grad(again, student2)
        assert torch.equal(again, base) or torch.allclose(again, base, rtol=1e-6, atol=0)
        assert torch.all(grad[masked] == 0)
        torch.testing.assert_close(grad[~masked], base_grad[~masked])


@pytest.mark.parametrize("name", DIVERGENCES)
def test_identical_inputs_give_zero(name):
    logits = torch.randn(4, 9, 33)
    assert abs(float(_call(name, logits, logits.clone(), None, temperature=2.0))) < 1e-6


def test_reductions_and_labels_none():
    student, teacher, labels = random_case((3, 8), 40, seed=7)
    count = int((labels != -100).sum())
    mean = forward_kl(student, teacher, labels, temperature=2.0)
    total = forward_kl(student, teacher, labels, temperature=2.0, reduction="sum")
    torch.testing.assert_close(total, mean * count)
    everything = forward_kl(student, teacher, None, temperature=2.0)
    torch.testing.assert_close(everything.double(), reference_loss("forward_kl", student, teacher, None, 2.0),
                               rtol=1e-5, atol=1e-7)
    with pytest.raises(LossConfigError, match="reduction"):
        forward_kl(student, teacher, labels, reduction="batchmean")


def test_no_counted_tokens_gives_zero_not_nan():
    student, teacher, _ = random_case((2, 4), 20, seed=8)
    labels = torch.full((2, 4), -100)
    student.requires_grad_(True)
    for chunk_size in (None, 3):
        loss = reverse_kl(student, teacher, labels, chunk_size=chunk_size)
        (grad,) = torch.autograd.grad(loss, student)
        assert loss.item() == 0.0 and torch.all(grad == 0)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_equals_trl_generalized_jsd_at_t1(beta):
    student, teacher, labels = random_case((3, 10), 300, seed=9)
    ours = jsd(student, teacher, labels, beta=beta)
    trl = trl_generalized_jsd_loss(student.double(), teacher.double(), labels, beta=beta)
    torch.testing.assert_close(ours.double(), trl, rtol=1e-5, atol=1e-7)


def test_jsd_limits_are_forward_and_reverse_kl():
    student, teacher, labels = random_case((2, 6), 80, seed=10)
    torch.testing.assert_close(jsd(student, teacher, labels, beta=0.0, temperature=2.0),
                               forward_kl(student, teacher, labels, temperature=2.0))
    torch.testing.assert_close(jsd(student, teacher, labels, beta=1.0, temperature=2.0),
                               reverse_kl(student, teacher, labels, temperature=2.0))


def test_cross_entropy_matches_reference_and_needs_no_teacher():
    student, _, labels = random_case((3, 12), 100, seed=11)
    torch.testing.assert_close(cross_entropy(student, labels).double(), reference_ce(student, labels))
    torch.testing.assert_close(cross_entropy(student, labels, chunk_size=5), cross_entropy(student, labels))


def test_padded_vocab_compares_the_shared_prefix():
    student, teacher, labels = random_case((2, 7), 64, seed=12)
    padded_teacher = torch.cat([teacher, torch.randn(2, 7, 8)], -1)  # teacher has 8 padding rows
    ours = forward_kl(student, padded_teacher, labels, temperature=2.0)
    torch.testing.assert_close(ours.double(), reference_loss("forward_kl", student, teacher, labels, 2.0))


def test_bad_parameters_and_shapes_say_what_to_fix():
    student, teacher, labels = random_case((2, 3), 10, seed=13)
    with pytest.raises(LossConfigError, match=r"beta=1.5 is outside \[0, 1\]"):
        jsd(student, teacher, labels, beta=1.5)
    with pytest.raises(LossConfigError, match="temperature must be a positive"):
        forward_kl(student, teacher, labels, temperature=0)
    with pytest.raises(LossInputError, match="labels have 4 positions but the logits/hidden states have 6"):
        forward_kl(student, teacher, labels[:, :2])
    with pytest.raises(LossInputError, match="must agree on every dimension"):
        forward_kl(student, teacher[:1], labels)
