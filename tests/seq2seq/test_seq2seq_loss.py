"""Seq2seq losses in DistillationTrainer: decoder-side labels, no causal shift, padding counted nowhere."""

import pytest
import torch

from s2s_trainer import seq2seq_trainer

from lmdistill.data.collate import DistillCollator
from lmdistill.errors import TrainingError
from lmdistill.losses import LOGIT_LOSSES, LossTerm

PAD, EOS = 0, 1
T = 2.0


def _examples(n=3, seed=0) -> list[dict]:
    """Encoder and decoder lengths differ within and between examples, so both sides get padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        src, tgt = 4 + 5 * i, 9 - 3 * i
        out.append({"input_ids": torch.randint(5, 300, (src,), generator=g).tolist() + [EOS],
                    "labels": torch.randint(5, 300, (tgt,), generator=g).tolist() + [EOS], "example_id": i})
    return out


def _trainer(student, teacher, tmp_path, terms, **kw):
    return seq2seq_trainer(student, teacher, tmp_path, terms, temperature=T, **kw)


def _reference_logits(model, batch):
    """Decoder inputs built by hand: the start token (pad for T5), then the labels shifted right, -100 -> pad."""
    labels = batch["labels"]
    decoder_in = torch.full_like(labels, PAD)
    decoder_in[:, 1:] = labels[:, :-1].clamp(min=0)  # -100 (padding) -> 0 (pad)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     decoder_input_ids=decoder_in).logits.double()


def test_loss_scores_each_label_at_its_own_decoder_position(t5_pair, tmp_path):
    teacher, student = t5_pair
    collate = DistillCollator(PAD, task_type="seq2seq")
    batch = collate(_examples())
    assert (batch["labels"] == -100).any() and (batch["attention_mask"] == 0).any()
    trainer = _trainer(student, teacher, tmp_path, [LossTerm("forward_kl", 0.6), LossTerm("cross_entropy", 0.4)])
    with torch.no_grad():
        got = trainer.compute_loss(student, batch)

    s, t = _reference_logits(student, batch), _reference_logits(teacher, batch)
    counted = batch["labels"] != -100  # the decoder mask: logit t scores label t, no shift
    log_p, log_q = torch.log_softmax(t / T, -1), torch.log_softmax(s / T, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)[counted].mean() * T * T
    ce = -torch.log_softmax(s, -1).gather(-1, batch["labels"].clamp(min=0)[..., None])[..., 0][counted].mean()
    torch.testing.assert_close(got.double(), 0.6 * kl + 0.4 * ce, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", LOGIT_LOSSES)
def test_padding_counts_in_no_logit_loss(t5_pair, tmp_path, name):
    """A padded batch gives the sum of its examples' losses taken one by one (no padding at all)."""
    teacher, student = t5_pair
    collate = DistillCollator(PAD, task_type="seq2seq")
    examples = _examples()
    total_tokens = sum(len(e["labels"]) for e in examples)
    trainer = _trainer(student, teacher, tmp_path, [LossTerm(name, 1.0)])
    with torch.no_grad():
        batched = trainer.compute_loss(student, collate(examples), num_items_in_batch=total_tokens)
        alone = sum(trainer.compute_loss(student, collate([e]), num_items_in_batch=total_tokens) for e in examples)
    assert torch.isfinite(batched) and batched > 0
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-6)


def test_fused_path_equals_the_logits_path(t5_pair, tmp_path):
    """T5 scales the decoder output by d_model^-0.5 before its tied lm_head: the fused loss must see that too."""
    teacher, student = t5_pair
    assert student.config.tie_word_embeddings and student.config.scale_decoder_outputs
    terms = [LossTerm("forward_kl", 0.7), LossTerm("cross_entropy", 0.3)]
    batch = DistillCollator(PAD, task_type="seq2seq")(_examples())
    results = []
    for fused in (False, True):
        trainer = _trainer(student, teacher, tmp_path, terms, fused=fused)
        student.zero_grad()
        loss = trainer.compute_loss(student, dict(batch))
        loss.backward()
        results.append((loss.detach(), student.lm_head.weight.grad.clone(),
                        student.encoder.block[0].layer[0].SelfAttention.q.weight.grad.clone()))
    student.zero_grad()
    for plain, fused in zip(*results):
        torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-6)


def test_fused_is_refused_for_a_head_bias_added_after_the_lm_head(t5_pair, tmp_path):
    from transformers import BartConfig, BartForConditionalGeneration

    teacher, _ = t5_pair
    bart = BartForConditionalGeneration(BartConfig(vocab_size=1024, d_model=16, encoder_layers=1, decoder_layers=1,
                                                   encoder_attention_heads=2, decoder_attention_heads=2,
                                                   encoder_ffn_dim=32, decoder_ffn_dim=32))
    with pytest.raises(TrainingError, match="cannot apply the student's final_logits_bias.*fused: false"):
        _trainer(bart, teacher, tmp_path, [LossTerm("forward_kl", 1.0)], fused=True)
