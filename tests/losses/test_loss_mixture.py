"""The several-teacher target: a weighted mixture of the teachers' distributions at the KD temperature."""

import itertools

import pytest
import torch

from lmdistill.losses import DistillObjective, LossTerm
from lmdistill.losses.errors import LossConfigError, LossInputError
from lmdistill.losses.mixture import mixture_log_probs, mixture_logits


def _reference(logits, weights, temperature):
    """log(sum_k w_k softmax(z_k / T)) in float64, probabilities summed directly."""
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    probs = sum(wk * torch.softmax(z.double() / temperature, dim=-1) for wk, z in zip(w, logits))
    return probs.log()


@pytest.mark.parametrize("weights,temperature", [((1.0, 1.0), 1.0), ((0.2, 0.8), 2.0), ((3.0, 1.0), 0.5),
                                                 ((1.0, 2.0, 3.0), 1.0), ((0.1, 0.1, 5.0), 4.0)])
def test_mixture_equals_a_float64_reference(weights, temperature):
    torch.manual_seed(len(weights) * 10 + int(temperature * 4))
    logits = [torch.randn(3, 5, 40) * 3 for _ in weights]
    got = mixture_log_probs(logits, weights, temperature)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _reference(logits, weights, temperature), atol=2e-5, rtol=1e-5)
    # as teacher logits, every divergence at T reads back the mixture itself
    back = torch.log_softmax(mixture_logits(logits, weights, temperature) / temperature, dim=-1)
    torch.testing.assert_close(back.double(), _reference(logits, weights, temperature), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl"])
def test_every_divergence_scores_the_mixture(loss):
    torch.manual_seed(0)
    student = torch.randn(2, 6, 30, requires_grad=True)
    teachers = [torch.randn(2, 6, 30) for _ in range(2)]
    labels = torch.randint(0, 30, (2, 6))
    objective = DistillObjective([LossTerm(loss)], temperature=2.0)
    out = objective(student, mixture_logits(teachers, [0.3, 0.7], 2.0), labels)
    # the same loss against a teacher whose logits are the float64 mixture's log-probs (x T)
    expected = objective(student, (_reference(teachers, [0.3, 0.7], 2.0) * 2.0).float(), labels)
    torch.testing.assert_close(out.total, expected.total, atol=1e-5, rtol=1e-5)
    out.total.backward()
    assert torch.isfinite(student.grad).all()


def test_one_teacher_of_weight_one_is_that_teacher():
    torch.manual_seed(1)
    z = torch.randn(4, 7, 25)
    torch.testing.assert_close(mixture_log_probs([z], [1.0], 3.0), torch.log_softmax(z / 3.0, dim=-1), atol=0, rtol=0)


def test_masked_tokens_and_padded_heads():
    z1, z2 = torch.randn(2, 12), torch.randn(2, 10)
    z1[:, 3] = float("-inf")
    z2[:, 3] = float("-inf")
    got = mixture_log_probs([z1, z2], [1.0, 1.0])
    assert got.shape == (2, 10) and torch.isneginf(got[:, 3]).all() and torch.isfinite(got[:, :3]).all()


@pytest.mark.parametrize("weights", [(1.0, 0.0), (1.0, -1.0), (1.0, float("nan")), (1.0,)])
def test_bad_weights_are_errors(weights):
    with pytest.raises(LossConfigError, match="mixture"):
        mixture_log_probs([torch.randn(2, 5)] * 2, weights)


@pytest.mark.parametrize("loss", ["forward_kl", "jsd"])
def test_fused_mixture_equals_the_logits_path(loss):
    """Two teachers at unequal weights, mixed per chunk from their hidden states and heads (one with a bias and a
    soft-cap): loss and gradients equal the logits path on the mixture of their full logits."""
    torch.manual_seed(3)
    hs, ws = torch.randn(2, 9, 8, requires_grad=True), torch.randn(40, 8, requires_grad=True)
    hidden = [torch.randn(2, 9, 6), torch.randn(2, 9, 12)]
    heads = [(torch.randn(40, 6), torch.randn(40), 20.0), (torch.randn(40, 12), None, None)]
    labels = torch.randint(0, 40, (2, 9))
    labels[0, :3] = -100
    weights = [0.25, 1.0]
    objective = DistillObjective([LossTerm(loss, 0.7), LossTerm("cross_entropy", 0.3)], temperature=2.0,
                                 chunk_size=5)
    fused = objective.fused(hs, ws, None, hidden, [w for w, _, _ in heads], [b for _, b, _ in heads], labels,
                            teacher_softcap=[c for _, _, c in heads], teacher_logit_scale=[1.0, 1.0],
                            mixture=weights)

    def logits(h, w, b, cap):
        z = h @ w.T + (b if b is not None else 0)
        return cap * torch.tanh(z / cap) if cap else z

    teacher = mixture_logits([logits(h, *head) for h, head in zip(hidden, heads)], weights, 2.0)
    plain = objective(logits(hs, ws, None, None), teacher, labels)
    torch.testing.assert_close(fused.total, plain.total, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(fused.total, (hs, ws)), torch.autograd.grad(plain.total, (hs, ws))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_mixture_needs_one_weight_per_teacher():
    objective = DistillObjective([LossTerm("forward_kl")])
    h, w = torch.randn(1, 3, 4), torch.randn(10, 4)
    with pytest.raises(LossInputError, match="2 teacher heads need as many mixture weights, got \\[1.0\\]"):
        objective.fused(h, w, None, [h, h], [w, w], [None, None], None, teacher_softcap=[None, None],
                        teacher_logit_scale=[1.0, 1.0], mixture=[1.0])
