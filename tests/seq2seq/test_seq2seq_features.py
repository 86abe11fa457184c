"""Seq2seq feature loss: encoder states under the encoder mask, decoder states under the label mask, each side with
its own layer map and projections; causal models keep the single-stack distiller."""

import pytest
import torch
from transformers import BartConfig, T5Config

from s2s_trainer import seq2seq_trainer

from lmdistill.config import StageSettings
from lmdistill.data.collate import DistillCollator
from lmdistill.losses import FeatureDistiller
from lmdistill.losses.errors import LossConfigError
from lmdistill.losses.features import EncoderDecoderFeatureDistiller
from lmdistill.train.stage import build_aux, model_dims

PAD, EOS = 0, 1
WEIGHT = 0.5


def _stage(kind="mse", layers="uniform") -> StageSettings:
    return StageSettings(name="f", losses=[{"name": "forward_kl"},
                                           {"name": "feature", "weight": WEIGHT, "kind": kind, "layers": layers}])


def _batch(seed=0) -> dict:
    """Source and target lengths differ between examples and from each other, so both sides carry padding."""
    g = torch.Generator().manual_seed(seed)
    examples = [{"input_ids": torch.randint(5, 300, (src,), generator=g).tolist() + [EOS],
                 "labels": torch.randint(5, 300, (tgt,), generator=g).tolist() + [EOS], "example_id": i}
                for i, (src, tgt) in enumerate([(3, 9), (11, 4), (7, 6)])]
    batch = DistillCollator(PAD, task_type="seq2seq")(examples)
    assert (batch["attention_mask"] == 0).any() and (batch["labels"] == -100).any()
    return batch


def _trainer(student, teacher, tmp_path, aux=None):
    return seq2seq_trainer(student, teacher, tmp_path, aux=aux)


def _states(model, batch):
    decoder_in = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=decoder_in,
                output_hidden_states=True)
    return out.encoder_hidden_states, out.decoder_hidden_states


def _reference_side(student_states, teacher_states, pairs, projections, mask, kind):
    """Plain float64 reference: per layer pair, project the student state, compare per token, mean over masked
    tokens; then mean over pairs."""
    keep = mask.bool()
    per_pair = []
    for (s, t), proj in zip(pairs, projections):
        student = student_states[s + 1].double() @ proj.weight.double().T + proj.bias.double()  # [B, T, d_t]
        teacher = teacher_states[t + 1].double()  # [B, T, d_t]
        if kind == "mse":
            per_token = ((student - teacher) ** 2).mean(-1)
        else:
            per_token = 1 - (student * teacher).sum(-1) / (student.norm(dim=-1) * teacher.norm(dim=-1))
        per_pair.append(per_token[keep].mean())
    return torch.stack(per_pair).mean()


def test_t5_gets_separate_encoder_and_decoder_maps_and_projections(t5_pair):
    teacher, student = t5_pair
    feature = build_aux(_stage(), student, teacher).feature
    assert isinstance(feature, EncoderDecoderFeatureDistiller)
    # Student 1 layer, teacher 2 on each side: the student's only layer meets the teacher's last one.
    assert feature.encoder.layer_map == [(0, 1)] and feature.decoder.layer_map == [(0, 1)]
    enc, dec = feature.encoder.projections[0], feature.decoder.projections[0]
    assert enc is not dec and (enc.in_features, enc.out_features) == (dec.in_features, dec.out_features) == (64, 128)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_feature_term_equals_reference_over_both_sides(t5_pair, tmp_path, kind):
    teacher, student = t5_pair
    aux = build_aux(_stage(kind), student, teacher)
    with torch.no_grad():  # random projections, so the two sides' projections differ
        for p in aux.feature.parameters():
            p.normal_(0, 0.2)
    batch = _batch()
    with torch.no_grad():
        got = (_trainer(student, teacher, tmp_path, aux).compute_loss(student, batch)
               - _trainer(student, teacher, tmp_path).compute_loss(student, batch))
        (s_enc, s_dec), (t_enc, t_dec) = _states(student, batch), _states(teacher, batch)
    f = aux.feature
    encoder = _reference_side(s_enc, t_enc, [(0, 1)], f.encoder.projections, batch["attention_mask"], kind)
    decoder = _reference_side(s_dec, t_dec, [(0, 1)], f.decoder.projections, batch["labels"] != -100, kind)
    assert encoder > 0 and decoder > 0
    torch.testing.assert_close(got.double(), WEIGHT * 0.5 * (encoder + decoder), rtol=1e-5, atol=1e-6)


def test_padding_on_either_side_counts_in_no_feature_term(t5_pair):
    """Garbage in masked positions (padded source tokens, unlabelled target positions) leaves the loss unchanged."""
    teacher, student = t5_pair
    feature = build_aux(_stage(), student, teacher).feature
    batch = _batch(seed=1)
    with torch.no_grad():
        (s_enc, s_dec), (t_enc, t_dec) = _states(student, batch), _states(teacher, batch)
        enc_mask, dec_mask = batch["attention_mask"], (batch["labels"] != -100).long()
        clean = feature(s_enc, t_enc, enc_mask, s_dec, t_dec, dec_mask)

        def spoil(states, mask):
            return tuple(h.masked_fill(~mask.bool()[..., None], 1e3) for h in states)

        spoiled = feature(spoil(s_enc, enc_mask), t_enc, enc_mask, spoil(s_dec, dec_mask), t_dec, dec_mask)
    torch.testing.assert_close(spoiled, clean)


def test_both_projections_get_gradients_and_are_optimised(t5_pair, tmp_path):
    teacher, student = t5_pair
    aux = build_aux(_stage(), student, teacher)
    trainer = _trainer(student, teacher, tmp_path, aux)
    student.zero_grad()
    trainer.compute_loss(student, _batch()).backward()
    projections = [aux.feature.encoder.projections[0], aux.feature.decoder.projections[0]]
    for proj in projections:
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    # The student's encoder learns from the encoder-side term too.
    assert student.encoder.block[0].layer[0].SelfAttention.q.weight.grad.abs().sum() > 0
    optimised = {id(p) for group in trainer.create_optimizer().param_groups for p in group["params"]}
    assert all(id(p) in optimised for proj in projections for p in proj.parameters())
    student.zero_grad()


def test_encoder_and_decoder_layer_counts_are_read_per_side():
    t5 = model_dims(T5Config(d_model=64, num_layers=2, num_decoder_layers=3),
                    T5Config(d_model=128, num_layers=6, num_decoder_layers=4))
    assert (t5.student_layers, t5.student_decoder_layers, t5.teacher_layers, t5.teacher_decoder_layers) == (2, 3, 6, 4)
    bart = model_dims(BartConfig(d_model=64, encoder_layers=1, decoder_layers=2),
                      BartConfig(d_model=128, encoder_layers=3, decoder_layers=5))
    assert (bart.student_layers, bart.student_decoder_layers, bart.teacher_layers, bart.teacher_decoder_layers) == (
        1, 2, 3, 5)
    assert (bart.student_hidden_size, bart.teacher_hidden_size) == (64, 128)


def test_uneven_stacks_get_their_own_uniform_maps():
    from lmdistill.losses.registry import build_aux_loss

    dims = model_dims(T5Config(d_model=64, num_layers=1, num_decoder_layers=2),
                      T5Config(d_model=128, num_layers=3, num_decoder_layers=4))
    feature = build_aux_loss({"name": "feature"}, dims).module
    assert feature.encoder.layer_map == [(0, 2)] and feature.decoder.layer_map == [(0, 1), (1, 3)]
    assert len(feature.encoder.projections) == 1 and len(feature.decoder.projections) == 2
    # Attention: encoder self-attention from the encoder counts; decoder self- and cross-attention from the decoder's.
    attention = build_aux_loss({"name": "attention"}, dims).module.per_side
    assert attention["encoder"].layer_map == [(0, 2)]
    assert attention["decoder"].layer_map == attention["cross"].layer_map == [(0, 1), (1, 3)]


def test_explicit_layers_must_fit_both_sides(t5_pair):
    teacher, student = t5_pair
    feature = build_aux(_stage(layers=[[0, 0]]), student, teacher).feature
    assert feature.encoder.layer_map == feature.decoder.layer_map == [(0, 0)]
    with pytest.raises(LossConfigError, match=r"encoder states: layers\[0\] = \[0, 2\].*teacher layers 0..1"):
        build_aux(_stage(layers=[[0, 2]]), student, teacher)


def test_causal_models_keep_the_single_stack_distiller(teacher_dir, student_dir):
    from transformers import AutoModelForCausalLM

    teacher, student = (AutoModelForCausalLM.from_pretrained(d) for d in (teacher_dir, student_dir))
    dims = model_dims(student.config, teacher.config)
    assert dims.student_decoder_layers is None and (dims.student_layers, dims.teacher_layers) == (2, 4)
    feature = build_aux(_stage(), student, teacher).feature
    assert type(feature) is FeatureDistiller and feature.layer_map == [(0, 1), (1, 3)]
