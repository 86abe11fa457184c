"""The logits path forms logits only where a term scores them: the student's and the teacher's lm_heads see the
counted positions alone (transformers' logits_to_keep), neither model keeps a key/value cache, and the loss and
gradients equal a plain full-logits reference."""

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, TrainingArguments

from lmdistill.data.collate import DistillCollator
from lmdistill.losses import DistillObjective, LossTerm
from lmdistill.train.trainer import DistillationTrainer


def _batch():
    g = torch.Generator().manual_seed(0)
    rows = []
    for length, prompt in ((14, 5), (9, 3), (12, 8)):  # prompts and padding differ per row
        ids = torch.randint(5, 300, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return DistillCollator(0)(rows)


def _reference(student, teacher, batch, temperature):
    """0.6 T^2 KL(p || q) + 0.4 CE over the counted tokens, from the full [B, T, V] logits of both models."""
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    target = batch["labels"][:, 1:]
    keep = target != -100
    lq, lp = F.log_softmax(s[keep] / temperature, -1), F.log_softmax(t[keep] / temperature, -1)
    kl = (lp.exp() * (lp - lq)).sum() * temperature**2
    ce = F.cross_entropy(s[keep], target[keep], reduction="sum")
    return (0.6 * kl + 0.4 * ce) / keep.sum()


def test_heads_see_only_the_counted_positions_and_the_loss_equals_a_full_logits_reference(student_dir, teacher_dir,
                                                                                          tmp_path):
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval().requires_grad_(False)
    objective = DistillObjective([LossTerm("forward_kl", 0.6, {}), LossTerm("cross_entropy", 0.4, {})], temperature=2.0)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, remove_unused_columns=False,
                             save_strategy="no")
    trainer = DistillationTrainer(model=student, args=args, data_collator=DistillCollator(0), teacher=teacher,
                                  objective=objective)
    batch = _batch()
    counted = int((batch["labels"][:, 1:] != -100).sum())
    rows, caches = [], []
    hooks = [m.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[:-1]))
             for m in (student, teacher)]
    hooks += [m.register_forward_hook(lambda module, args, out: caches.append(out.past_key_values))
              for m in (student, teacher)]
    try:
        loss = trainer.compute_loss(student, dict(batch), num_items_in_batch=counted)
    finally:
        for hook in hooks:
            hook.remove()
    assert rows == [torch.Size([counted])] * 2  # [n, H] rows into each head, not [B, T, H]
    assert caches == [None, None]
    loss.backward()
    got = [p.grad.clone() for p in (student.lm_head.weight, student.model.layers[0].mlp.up_proj.weight)]
    student.zero_grad()
    expected = _reference(student, teacher, batch, 2.0)
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    for a, b in zip(got, (student.lm_head.weight.grad, student.model.layers[0].mlp.up_proj.weight.grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
