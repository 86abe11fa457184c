"""Seq2seq contrastive and attention terms: the encoder side under the encoder mask, the decoder side under the label
mask (and, for attention, cross-attention: rows by the decoder mask, keys by the encoder mask), each side with its own
projections / layer map, the term the mean over its sides. References are plain float64 code written here."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from s2s_trainer import seq2seq_trainer

from lmdistill.config import StageSettings, config_from_dict
from lmdistill.data.collate import DistillCollator
from lmdistill.errors import ConfigError
from lmdistill.losses import ModelDims, build_losses
from lmdistill.losses.errors import LossConfigError
from lmdistill.train.pipeline import run_pipeline
from lmdistill.train.stage import build_aux
from lmdistill.train.trainer import AUX_FILE

PAD, EOS = 0, 1
WEIGHT = 0.5
TEMPERATURE = 0.1


def _stage(*terms: dict) -> StageSettings:
    return StageSettings(name="aux", losses=[{"name": "forward_kl"}, *terms])


def _batch(seed=0) -> dict:
    """Source and target lengths differ between examples, so both sides carry padding."""
    g = torch.Generator().manual_seed(seed)
    examples = [{"input_ids": torch.randint(5, 300, (src,), generator=g).tolist() + [EOS],
                 "labels": torch.randint(5, 300, (tgt,), generator=g).tolist() + [EOS], "example_id": i}
                for i, (src, tgt) in enumerate([(3, 9), (11, 4), (7, 6), (5, 2)])]
    batch = DistillCollator(PAD, task_type="seq2seq")(examples)
    assert (batch["attention_mask"] == 0).any() and (batch["labels"] == -100).any()
    return batch


def _masks(batch) -> tuple[torch.Tensor, torch.Tensor]:
    return batch["attention_mask"], (batch["labels"] != -100).long()


def _trainer(student, teacher, tmp_path, aux=None):
    return seq2seq_trainer(student, teacher, tmp_path, aux=aux)


def _outputs(model, batch):
    decoder_in = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=decoder_in,
                 output_hidden_states=True, output_attentions=True)


def _aux_term(student, teacher, tmp_path, aux, batch) -> torch.Tensor:
    """The weighted auxiliary term as the trainer adds it: total loss with it minus total loss without it."""
    with torch.no_grad():
        return (_trainer(student, teacher, tmp_path, aux).compute_loss(student, batch)
                - _trainer(student, teacher, tmp_path).compute_loss(student, batch)).double()


# ---------------------------------------------------------------------------------------------- float64 references
def _info_nce(student, teacher, mask, side, weights) -> torch.Tensor:
    """Symmetric InfoNCE of masked-mean-pooled last states through `side`'s projections, each example's loss weighted
    by weights [B] (its counted labels). States [B, T, d]."""
    m = mask.double()[..., None]  # [B, T, 1]

    def embed(states, proj):
        pooled = (states.double() * m).sum(1) / m.sum(1)  # [B, d]
        z = pooled @ proj.weight.double().T + proj.bias.double()
        return z / z.norm(dim=-1, keepdim=True)

    logits = embed(student, side.student_proj) @ embed(teacher, side.teacher_proj).T / TEMPERATURE  # [B, B]
    w = weights.double() / weights.sum()
    rows = ((logits.logsumexp(1) - logits.diag()) * w).sum()
    cols = ((logits.logsumexp(0) - logits.diag()) * w).sum()
    return 0.5 * (rows + cols)


def _attention_kl(student, teacher, rows, keys) -> torch.Tensor:
    """KL(teacher || student) per query row summed over unmasked keys, mean over heads and counted rows. Maps
    [B, H, T, K] with equal head counts; rows [B, T], keys [B, K]."""
    s, t = student.double(), teacher.double()
    per_key = t * (t.clamp_min(1e-300).log() - s.clamp_min(1e-300).log()) * keys.double()[:, None, None, :]
    per_row = per_key.sum(-1)  # [B, H, T]
    return per_row[rows.bool()[:, None, :].expand_as(per_row)].mean()


def _attention_sides(s_out, t_out, enc_mask, dec_mask) -> dict[str, torch.Tensor]:
    """Student 1 layer, teacher 2 per stack: the student's layer meets the teacher's last (uniform map)."""
    return {"encoder": _attention_kl(s_out.encoder_attentions[0], t_out.encoder_attentions[1], enc_mask, enc_mask),
            "decoder": _attention_kl(s_out.decoder_attentions[0], t_out.decoder_attentions[1], dec_mask, dec_mask),
            "cross": _attention_kl(s_out.cross_attentions[0], t_out.cross_attentions[1], dec_mask, enc_mask)}


@pytest.fixture
def contrastive(t5_pair):
    """A contrastive term with random (so per-side different) projections."""
    teacher, student = t5_pair
    aux = build_aux(_stage({"name": "contrastive", "weight": WEIGHT, "temperature": TEMPERATURE}), student, teacher)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in aux.contrastive.parameters():
            p.normal_(0, 0.3)
    return aux


@pytest.fixture
def attention(t5_pair):
    teacher, student = t5_pair
    return build_aux(_stage({"name": "attention", "weight": WEIGHT}), student, teacher)


# ---------------------------------------------------------------------------------------------- the terms
def test_contrastive_term_is_the_mean_of_one_infonce_per_side(t5_pair, tmp_path, contrastive):
    teacher, student = t5_pair
    sides = contrastive.contrastive.per_side
    assert set(sides) == {"encoder", "decoder"} and sides["encoder"].student_proj is not sides["decoder"].student_proj
    batch = _batch()
    got = _aux_term(student, teacher, tmp_path, contrastive, batch)
    with torch.no_grad():
        s_out, t_out = _outputs(student, batch), _outputs(teacher, batch)
    enc_mask, dec_mask = _masks(batch)
    labels = dec_mask.sum(1)
    encoder = _info_nce(s_out.encoder_last_hidden_state, t_out.encoder_last_hidden_state, enc_mask, sides["encoder"],
                        labels)
    decoder = _info_nce(s_out.decoder_hidden_states[-1], t_out.decoder_hidden_states[-1], dec_mask, sides["decoder"],
                        labels)
    assert encoder > 0 and decoder > 0 and abs(encoder - decoder) > 1e-3
    torch.testing.assert_close(got, WEIGHT * 0.5 * (encoder + decoder), rtol=1e-5, atol=1e-6)


def test_attention_term_is_the_mean_of_encoder_decoder_and_cross_attention(t5_pair, tmp_path, attention):
    teacher, student = t5_pair
    batch = _batch()
    got = _aux_term(student, teacher, tmp_path, attention, batch)
    with torch.no_grad():
        sides = _attention_sides(_outputs(student, batch), _outputs(teacher, batch), *_masks(batch))
    assert all(v > 0 for v in sides.values())
    torch.testing.assert_close(got, WEIGHT * sum(sides.values()) / 3, rtol=1e-5, atol=1e-6)


def test_a_row_with_no_counted_label_counts_in_no_term(t5_pair, tmp_path, attention):
    """A row whose labels are all -100 (a filler completing the processes' last round, data/rounds.py) adds nothing
    to any side, the encoder's included: the term is the one without that row."""
    teacher, student = t5_pair
    batch = _batch()
    with_filler = {key: torch.cat([value, value[:1]]) for key, value in batch.items()}
    with_filler["labels"][-1] = -100
    torch.testing.assert_close(_aux_term(student, teacher, tmp_path, attention, with_filler),
                               _aux_term(student, teacher, tmp_path, attention, batch))


def test_padding_on_either_side_counts_in_no_term(t5_pair, contrastive, attention):
    """Garbage at padded source positions and at target positions past the labels leaves both terms unchanged;
    the same garbage at one counted position changes them (so the check bites)."""
    teacher, student = t5_pair
    batch = _batch(seed=1)
    enc_mask, dec_mask = _masks(batch)
    with torch.no_grad():
        s, t = _outputs(student, batch), _outputs(teacher, batch)

    def spoil(x, rows, keys=None):  # [B, T, d] states or [B, H, T, K] maps: 1e3 wherever a mask is 0
        if keys is None:
            return x.masked_fill(~rows.bool()[..., None], 1e3)
        out = x.masked_fill(~rows.bool()[:, None, :, None], 1e3)
        return out.masked_fill(~keys.bool()[:, None, None, :], 1e3)

    def contrastive_term(s_enc, s_dec):
        return contrastive.contrastive(s_enc, t.encoder_hidden_states[-1], enc_mask,
                                       s_dec, t.decoder_hidden_states[-1], dec_mask)

    def attention_term(s_enc, s_dec, s_cross):
        return attention.attention((s_enc,), t.encoder_attentions, enc_mask, (s_dec,), t.decoder_attentions,
                                   dec_mask, (s_cross,), t.cross_attentions)

    with torch.no_grad():
        s_enc, s_dec = s.encoder_hidden_states[-1], s.decoder_hidden_states[-1]
        clean = contrastive_term(s_enc, s_dec)
        torch.testing.assert_close(contrastive_term(spoil(s_enc, enc_mask), s_dec), clean)
        torch.testing.assert_close(contrastive_term(s_enc, spoil(s_dec, dec_mask)), clean)
        one = torch.ones_like(dec_mask)
        one[0, 0] = 0  # a counted position on either side
        assert not torch.allclose(contrastive_term(spoil(s_enc, one[:, :1].expand_as(enc_mask)), s_dec), clean)

        maps = s.encoder_attentions[0], s.decoder_attentions[0], s.cross_attentions[0]
        clean = attention_term(*maps)
        spoiled = (spoil(maps[0], enc_mask, enc_mask), spoil(maps[1], dec_mask, dec_mask),
                   spoil(maps[2], dec_mask, enc_mask))
        torch.testing.assert_close(attention_term(*spoiled), clean)
        assert not torch.allclose(attention_term(spoil(maps[0], one[:, :1].expand_as(enc_mask)), *maps[1:]), clean)


def test_each_side_contributes_on_its_own(t5_pair, contrastive, attention):
    """Attention: a side whose student maps equal the teacher's adds zero and leaves the others' terms; contrastive:
    moving the encoder side changes the term by half its own change, the decoder side untouched."""
    teacher, student = t5_pair
    batch = _batch(seed=2)
    enc_mask, dec_mask = _masks(batch)
    with torch.no_grad():
        s, t = _outputs(student, batch), _outputs(teacher, batch)
        refs = _attention_sides(s, t, enc_mask, dec_mask)
        teacher_maps = {"encoder": t.encoder_attentions, "decoder": t.decoder_attentions, "cross": t.cross_attentions}
        student_maps = {"encoder": s.encoder_attentions, "decoder": s.decoder_attentions, "cross": s.cross_attentions}
        for same in refs:
            # The teacher's mapped (last) layer replaced by the student's own maps on side `same`.
            targets = {side: (teacher_maps[side][0], *student_maps[side]) if side == same else teacher_maps[side]
                       for side in refs}
            got = attention.attention(student_maps["encoder"], targets["encoder"], enc_mask, student_maps["decoder"],
                                      targets["decoder"], dec_mask, student_maps["cross"], targets["cross"])
            others = [v for side, v in refs.items() if side != same]
            torch.testing.assert_close(got.double(), sum(others) / 3, rtol=1e-5, atol=1e-6)

        sides = contrastive.contrastive.per_side
        s_enc, t_enc = s.encoder_last_hidden_state, t.encoder_last_hidden_state
        s_dec, t_dec = s.decoder_hidden_states[-1], t.decoder_hidden_states[-1]
        shuffled = t_enc[torch.tensor([1, 2, 3, 0])]
        before = contrastive.contrastive(s_enc, t_enc, enc_mask, s_dec, t_dec, dec_mask)
        after = contrastive.contrastive(s_enc, shuffled, enc_mask, s_dec, t_dec, dec_mask)
        labels = dec_mask.sum(1)
        change = (_info_nce(s_enc, shuffled, enc_mask, sides["encoder"], labels)
                  - _info_nce(s_enc, t_enc, enc_mask, sides["encoder"], labels))
        assert abs(change) > 1e-2
        torch.testing.assert_close((after - before).double(), 0.5 * change, rtol=1e-4, atol=1e-6)


def test_gradients_reach_both_sides_and_the_student_encoder(t5_pair, tmp_path, contrastive):
    teacher, student = t5_pair
    batch = _batch()
    student.zero_grad()
    _trainer(student, teacher, tmp_path, contrastive).compute_loss(student, batch).backward()
    for side in ("encoder", "decoder"):
        for proj in ("student_proj", "teacher_proj"):
            grad = getattr(contrastive.contrastive.per_side[side], proj).weight.grad
            assert grad is not None and grad.abs().sum() > 0, (side, proj)
    optimised = {id(p) for group in _trainer(student, teacher, tmp_path, contrastive).create_optimizer().param_groups
                 for p in group["params"]}
    assert all(id(p) in optimised for p in contrastive.contrastive.parameters())

    # Attention: the encoder side trains the student's encoder, the cross side its decoder's cross-attention.
    for side, weight in (("encoder", student.encoder.block[0].layer[0].SelfAttention.q.weight),
                         ("cross", student.decoder.block[0].layer[1].EncDecAttention.q.weight)):
        aux = build_aux(_stage({"name": "attention", "sides": [side]}), student, teacher)
        student.zero_grad()
        s, t = _outputs(student, batch), _outputs(teacher, batch)
        aux.attention(s.encoder_attentions, t.encoder_attentions, batch["attention_mask"], s.decoder_attentions,
                      t.decoder_attentions, _masks(batch)[1], s.cross_attentions, t.cross_attentions).backward()
        assert weight.grad is not None and weight.grad.abs().sum() > 0, side
    student.zero_grad()


# ---------------------------------------------------------------------------------------------- the sides knob
def test_sides_choose_what_is_built_and_bad_sides_fail_at_load():
    t5 = ModelDims(64, 128, 1, 2, student_decoder_layers=1, teacher_decoder_layers=2)
    built = build_losses([{"name": "contrastive", "sides": ["decoder"]},
                          {"name": "attention", "sides": ["cross", "encoder"]}], t5)
    contrastive, attention = (a.module for a in built.aux)
    assert sorted(contrastive.state_dict()) == ["per_side.decoder.student_proj.bias",
                                                "per_side.decoder.student_proj.weight",
                                                "per_side.decoder.teacher_proj.bias",
                                                "per_side.decoder.teacher_proj.weight"]
    assert attention.sides == ("encoder", "cross")
    with pytest.raises(LossConfigError, match=r"contrastive loss: unknown side\(s\) \['cross'\]; choose from"):
        build_losses([{"name": "contrastive", "sides": ["cross"]}], t5)
    with pytest.raises(LossConfigError, match=r"loss 'attention': sides \['encoder'\] applies to encoder-decoder "
                                              r"models only; these models are causal LMs: remove sides"):
        build_losses([{"name": "attention", "sides": ["encoder"]}], ModelDims(64, 128, 2, 4))

    def load(term):
        return config_from_dict({"stages": [{"name": "s", "max_steps": 1, "losses": [term]}]})

    with pytest.raises(ConfigError, match=r"stages\[0\]\.losses\[0\]\.sides: sides \['decoder', 'decoder'\] repeat "
                                          r"a side; list each once"):
        load({"name": "contrastive", "sides": ["decoder", "decoder"]})
    with pytest.raises(ConfigError, match=r"stages\[0\]\.losses\[0\]\.sides\[0\]: Input should be 'encoder' or "
                                          r"'decoder'"):
        load({"name": "contrastive", "sides": ["cross"]})
    with pytest.raises(ConfigError, match=r"stages\[0\]\.losses\[0\]\.sides: List should have at least 1 item"):
        load({"name": "attention", "sides": []})
    assert load({"name": "attention", "sides": ["cross"]}).stages[0].losses[0].sides == ["cross"]


# ---------------------------------------------------------------------------------------------- end to end
STAGE = {"name": "kd", "max_steps": 4, "save_steps": 2,
         "losses": [{"name": "forward_kl"}, {"name": "contrastive", "weight": 0.1},
                    {"name": "attention", "weight": 0.1}]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, t5_teacher_dir, t5_student_dir, seq2seq_jsonl):
    """The tiny T5 pair trained 4 steps with both terms (checkpoints at 2 and 4), then the same run interrupted after
    step 2 (its checkpoint-4, best, final and state removed) and re-run: (uninterrupted dir, resumed dir)."""
    root = tmp_path_factory.mktemp("s2s_aux_runs")
    config = config_from_dict({
        "teacher": {"name": str(t5_teacher_dir)}, "student": {"name": str(t5_student_dir)},
        "data": {"max_length": 32, "sources": {"pairs": {"path": str(seq2seq_jsonl)}}},
        "training": {"batch_size": 8, "learning_rate": 3e-3, "logging_steps": 1, "report_to": [],
                     "lr_scheduler_type": "constant", "no_cuda": True},
        "evaluation": {"enabled": False, "report": False}, "output_dir": str(root / "run"), "stages": [STAGE]})
    run_dir = run_pipeline(config)
    resumed_dir = root / "resumed"
    shutil.copytree(run_dir, resumed_dir, ignore=shutil.ignore_patterns("checkpoint-4", "best", "final"))
    (resumed_dir / "pipeline_state.json").unlink()
    run_pipeline(config.model_copy(update={"output_dir": str(resumed_dir)}))
    return run_dir, resumed_dir


def _logged(run_dir) -> list[dict]:
    return [h for h in json.loads((run_dir / "kd" / "log_history.json").read_text()) if "loss/contrastive" in h]


def test_t5_pair_trains_with_both_terms_and_resume_restores_both_sides(runs):
    run_dir, resumed_dir = runs
    logged = _logged(run_dir)
    assert len(logged) == 4 and all(
        torch.isfinite(torch.tensor([h["loss/contrastive"], h["loss/attention"]])).all() for h in logged), logged
    halfway, final = (load_file(run_dir / "kd" / f"checkpoint-{n}" / AUX_FILE) for n in (2, 4))
    assert {k.split(".")[2] for k in final} == {"encoder", "decoder"}  # contrastive.per_side.<side>.<proj>.<param>
    assert all(not torch.equal(halfway[k], final[k]) for k in halfway)  # both sides' projections train
    # Step 3 after the resume scores with the projections restored from checkpoint-2: every term as uninterrupted.
    resumed = {h["step"]: h for h in _logged(resumed_dir)}
    step3 = {k: v for k, v in resumed[3].items() if k.startswith("loss")}
    assert sorted(resumed) == [1, 2, 3, 4] and step3 == {k: logged[2][k] for k in step3}


def test_resumed_run_ends_with_the_uninterrupted_projections(runs):
    final, resumed = (load_file(d / "kd" / "checkpoint-4" / AUX_FILE) for d in runs)
    assert resumed.keys() == final.keys()
    for key, value in final.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6)
