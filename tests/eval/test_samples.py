"""Teacher vs student samples: during training through the callback, into samples.jsonl, logs and TensorBoard."""

from __future__ import annotations

import json
import logging

import torch
from transformers import Trainer, TrainingArguments

from lmdistill.eval.metrics import generate_continuations
from lmdistill.eval.samples import SamplesCallback, read_samples, side_by_side, write_samples

PROMPTS = ["What does the bank report?", "What does a trader expect?"]


def _collate(batch: list[dict]) -> dict[str, torch.Tensor]:
    width = max(len(ex["input_ids"]) for ex in batch)
    return {"input_ids": torch.tensor([ex["input_ids"] + [0] * (width - len(ex["input_ids"])) for ex in batch]),
            "attention_mask": torch.tensor([[1] * len(ex["input_ids"]) + [0] * (width - len(ex["input_ids"]))
                                            for ex in batch]),
            "labels": torch.tensor([ex["labels"] + [-100] * (width - len(ex["labels"])) for ex in batch])}


def test_side_by_side_pairs_teacher_and_student_answers(teacher, student, tokenizer):
    teacher_out = generate_continuations(teacher, tokenizer, PROMPTS, max_new_tokens=3)
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    records = side_by_side(teacher_out, student, tokenizer, ids, max_new_tokens=3)
    assert [r["prompt"] for r in records] == PROMPTS  # token-id prompts are shown as text
    assert [r["teacher"] for r in records] == teacher_out
    assert [r["student"] for r in records] == generate_continuations(student, tokenizer, PROMPTS, max_new_tokens=3)


def test_callback_writes_samples_at_every_evaluation(teacher, student_dir, tokenizer, qa_examples, tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(student_dir)  # trained here: not the shared fixture
    callback = SamplesCallback(teacher, tokenizer, PROMPTS, tmp_path, stage="stage1", max_new_tokens=3,
                               tensorboard_dir=tmp_path / "runs" / "stage1")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, eval_strategy="steps", eval_steps=1,
                             per_device_train_batch_size=2, per_device_eval_batch_size=2, report_to=[],
                             save_strategy="no", use_cpu=True, remove_unused_columns=False, learning_rate=1e-2)
    trainer = Trainer(model=student, args=args, train_dataset=qa_examples, eval_dataset=qa_examples[:2],
                      data_collator=_collate, callbacks=[callback])
    with caplog.at_level(logging.INFO, logger="lmdistill.eval.samples"):
        trainer.train()
    records = read_samples(tmp_path)
    assert [(r["stage"], r["step"]) for r in records] == [("stage1", 1)] * 2 + [("stage1", 2)] * 2
    assert {r["prompt"] for r in records} == set(PROMPTS)
    assert all(set(r) == {"stage", "step", "prompt", "teacher", "student"} for r in records)
    assert "sample [stage1 step 2]" in caplog.text and "teacher:" in caplog.text
    events = EventAccumulator(str(tmp_path / "runs" / "stage1"), size_guidance={"tensors": 0})
    events.Reload()
    assert "samples/stage1/text_summary" in events.Tags()["tensors"]
    assert len(events.Tensors("samples/stage1/text_summary")) == 2


def test_read_samples_skips_a_line_cut_short_by_a_kill(tmp_path):
    write_samples(tmp_path, [{"prompt": "p", "teacher": "t", "student": "s"}], stage="final", step=7)
    with (tmp_path / "samples.jsonl").open("a") as fh:
        fh.write('{"stage": "final", "prompt": "cut')
    assert read_samples(tmp_path) == [{"stage": "final", "step": 7, "prompt": "p", "teacher": "t", "student": "s"}]
    assert json.loads((tmp_path / "samples.jsonl").read_text().splitlines()[0])["step"] == 7
