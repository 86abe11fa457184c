"""Feature, attention and contrastive terms, the balancer and the registry, on tiny Llama models
(teacher 4 layers x 128, 4 heads; student 2 x 64, 2 heads) and on random tensors with plain references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmdistill.losses import (AttentionDistiller, ContrastiveDistiller, FeatureDistiller, LossBalancer,
                              LossConfigError, LossInputError, ModelDims, attention_loss, build_losses,
                              resolve_layer_map)
from lmdistill.models.tiny import tiny_causal_lm


@pytest.fixture(scope="module")
def outputs():
    teacher = tiny_causal_lm(256, num_layers=4, hidden_size=128, num_heads=4, seed=1).eval()
    student = tiny_causal_lm(256, num_layers=2, hidden_size=64, num_heads=2, seed=2)
    for model in (teacher, student):
        model.set_attn_implementation("eager")
    ids = torch.randint(2, 256, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 7:] = 0  # right padding
    with torch.no_grad():
        t_out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    s_out = student(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    return student, s_out, t_out, mask


def test_uniform_layer_map_and_explicit_pairs():
    assert resolve_layer_map("uniform", 2, 4) == [(0, 1), (1, 3)]
    assert resolve_layer_map("uniform", 4, 6) == [(0, 1), (1, 2), (2, 4), (3, 5)]  # round half up
    assert resolve_layer_map("uniform", 3, 3) == [(0, 0), (1, 1), (2, 2)]
    assert resolve_layer_map([[0, 0], [1, 2]], 2, 4) == [(0, 0), (1, 2)]
    with pytest.raises(LossConfigError, match=r"layers\[1\] = \[1, 4\]: student layers are 0..1 and teacher"):
        resolve_layer_map([[0, 0], [1, 4]], 2, 4)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_feature_loss_matches_plain_reference_and_trains_projections(outputs, kind):
    student, s_out, t_out, mask = outputs
    distiller = FeatureDistiller(64, 128, 2, 4, layers="uniform", kind=kind)
    loss = distiller(s_out.hidden_states, t_out.hidden_states, mask)
    expected = []
    for (s, t), proj in zip([(0, 1), (1, 3)], distiller.projections):
        a, b = proj(s_out.hidden_states[s + 1]), t_out.hidden_states[t + 1]
        per = ((a - b) ** 2).mean(-1) if kind == "mse" else 1 - F.cosine_similarity(a, b, dim=-1)
        expected.append(per[mask.bool()].mean())
    torch.testing.assert_close(loss, torch.stack(expected).mean())
    loss.backward(retain_graph=True)
    assert len(list(distiller.parameters())) == 4  # Linear(64, 128) weight + bias per pair
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.parameters())
    assert student.model.layers[0].mlp.up_proj.weight.grad is not None
    student.zero_grad()
    same_width = FeatureDistiller(128, 128, 4, 4, kind=kind)
    assert len(list(same_width.parameters())) == 0
    torch.testing.assert_close(same_width(t_out.hidden_states, t_out.hidden_states, mask), torch.tensor(0.0),
                               atol=1e-6, rtol=0)
    with pytest.raises(LossInputError, match="hold 5 entries but the loss was built for 2 layers"):
        distiller(t_out.hidden_states, t_out.hidden_states, mask)


def _plain_attention_kl(a_s, a_t, mask):
    kl = (a_t * (a_t.clamp_min(1e-30).log() - a_s.clamp_min(1e-30).log())).sum(-1)  # [B, H, T]
    rows = mask.bool()[:, None, :].expand_as(kl)
    return kl[rows].mean()


def test_attention_loss_group_and_average_against_reference():
    g = torch.Generator().manual_seed(1)
    a_s = torch.softmax(torch.randn(2, 2, 6, 6, generator=g), -1)
    a_t = torch.softmax(torch.randn(2, 4, 6, 6, generator=g), -1)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    grouped = a_t.reshape(2, 2, 2, 6, 6).mean(2)  # teacher heads (0,1) -> 0, (2,3) -> 1
    torch.testing.assert_close(attention_loss([a_s], [a_t], mask, heads="group"),
                               _plain_attention_kl(a_s, grouped, mask))
    torch.testing.assert_close(attention_loss([a_s], [a_t], mask, heads="average"),
                               _plain_attention_kl(a_s.mean(1, keepdim=True), a_t.mean(1, keepdim=True), mask))
    three = torch.softmax(torch.randn(2, 3, 6, 6, generator=g), -1)
    torch.testing.assert_close(attention_loss([a_s], [three], mask),  # auto: 2 and 3 -> average
                               attention_loss([a_s], [three], mask, heads="average"))
    with pytest.raises(LossConfigError, match="needs one head count to divide the other"):
        attention_loss([a_s], [three], mask, heads="group")
    perturbed = a_s.clone()
    perturbed[1, :, 4:] = 0.5  # padded query rows hold anything
    torch.testing.assert_close(attention_loss([perturbed], [a_t], mask), attention_loss([a_s], [a_t], mask))


def test_attention_distiller_on_models_with_different_layers_and_heads(outputs):
    _, s_out, t_out, mask = outputs
    distiller = AttentionDistiller(2, 4)
    loss = distiller(s_out.attentions, t_out.attentions, mask)
    assert loss.item() > 0 and torch.isfinite(loss)
    loss.backward(retain_graph=True)
    with pytest.raises(LossInputError, match="attn_implementation='eager'"):
        distiller(None, t_out.attentions, mask)


def test_contrastive_is_lower_for_aligned_pairs(outputs):
    g = torch.Generator().manual_seed(2)
    teacher = torch.randn(8, 5, 128, generator=g)
    mixing = torch.randn(128, 64, generator=g) / 128**0.5
    student = teacher @ mixing + 0.05 * torch.randn(8, 5, 64, generator=g)  # a function of the same input
    distiller = ContrastiveDistiller(64, 128, proj_dim=32, temperature=0.1)
    with torch.no_grad():  # projections that agree on the shared space, as training would find
        distiller.student_proj.weight.copy_(torch.randn(32, 64, generator=g))
        distiller.teacher_proj.weight.copy_(distiller.student_proj.weight @ mixing.T)
        distiller.student_proj.bias.zero_()
        distiller.teacher_proj.bias.zero_()
    mask = torch.ones(8, 5)
    aligned = distiller(student, teacher, mask)
    shuffled = distiller(student[torch.randperm(8, generator=g)], teacher, mask)
    assert aligned < shuffled
    _, s_out, t_out, real_mask = outputs
    loss = ContrastiveDistiller(64, 128)(s_out.hidden_states, t_out.hidden_states, real_mask)
    assert loss.shape == () and torch.isfinite(loss)


def test_loss_scale_balances_magnitudes():
    x = torch.ones((), requires_grad=True)
    balancer = LossBalancer("loss_scale", ema=0.5)
    for _ in range(3):
        total = balancer.combine({"big": 1000.0 * x, "small": 0.01 * x}, {"big": 1.0, "small": 1.0})
    (grad,) = torch.autograd.grad(total, x)
    torch.testing.assert_close(grad, torch.tensor(2.0), rtol=1e-5, atol=0)  # each term now contributes ~1


def test_gradnorm_moves_term_gradient_norms_toward_equal():
    torch.manual_seed(0)
    shared = torch.nn.Linear(8, 8)
    head_a, head_b = torch.nn.Linear(8, 1), torch.nn.Linear(8, 1)
    data = torch.randn(16, 8)
    balancer = LossBalancer("gradnorm", lr=0.2)
    weights = {"a": 1.0, "b": 1.0}
    ratios = []
    for _ in range(30):
        h = torch.tanh(shared(data))
        terms = {"a": 50.0 * head_a(h).pow(2).mean(), "b": 0.1 * head_b(h).pow(2).mean()}
        norms = balancer.gradient_norms(terms, list(shared.parameters()))
        mult = {n: balancer.multipliers.get(n, 1.0) for n in terms}
        weighted = {n: mult[n] * weights[n] * norms[n] for n in terms}
        ratios.append(max(weighted.values()) / min(weighted.values()))
        balancer.combine(terms, weights, shared.parameters())
    assert ratios[0] > 100 and ratios[-1] < 1.1 and ratios == sorted(ratios, reverse=True)
    with pytest.raises(LossConfigError, match="needs shared_params"):
        balancer.combine(terms, weights)


def test_registry_builds_everything_from_dicts():
    dims = ModelDims(64, 128, 2, 4)
    built = build_losses([{"name": "cross_entropy", "weight": 0.3}, {"name": "jsd", "weight": 0.7, "beta": 0.5},
                          {"name": "feature", "weight": 0.1, "kind": "cosine", "layers": "uniform"},
                          {"name": "attention", "weight": 0.05},
                          {"name": "contrastive", "weight": 0.05, "temperature": 0.1}], dims, temperature=2.0)
    assert [t.name for t in built.objective.terms] == ["cross_entropy", "jsd"]
    assert built.objective.temperature == 2.0
    assert [(a.name, a.weight, a.requires) for a in built.aux] == [
        ("feature", 0.1, "hidden_states"), ("attention", 0.05, "attentions"), ("contrastive", 0.05, "hidden_states")]
    assert set(built.trainable_modules()) == {"feature", "contrastive"}
    with pytest.raises(LossConfigError, match="loss 'feature': unknown parameter.* beta; accepted: kind, layers"):
        build_losses([{"name": "feature", "beta": 1}], dims)
    with pytest.raises(LossConfigError, match=r"losses\[0\]: unknown loss 'kld'"):
        build_losses([{"name": "kld"}])
    with pytest.raises(LossConfigError, match="feature loss kind must be one of"):
        build_losses([{"name": "feature", "kind": "l1"}], dims)
