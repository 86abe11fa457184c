"""One epoch of DistillationTrainer under torchrun (2 processes, gloo), for test_ddp_rounds.py (not a test module).

argv: student_dir teacher_dir out_dir rows batch eval_rows. The training set is `rows` examples, the eval set the
first `eval_rows`, evaluated before training (batch `batch` per process). Each process writes out_dir/rank{R}.json:
per training micro-batch, its example ids, each row's counted labels (after the causal shift) and the step's token
count over both processes (num_items_in_batch); and out_dir/eval{R}.json: the evaluation's metrics.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, TrainingArguments

from lmdistill.data.collate import DistillCollator
from lmdistill.losses import DistillObjective, LossTerm
from lmdistill.train.trainer import DistillationTrainer


OBJECTIVE = DistillObjective([LossTerm("forward_kl", 0.5), LossTerm("cross_entropy", 0.5)])


def examples(rows: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(rows):
        length = int(torch.randint(6, 14, (1,), generator=g))
        ids = torch.randint(5, 300, (length,), generator=g).tolist()
        prompt = int(torch.randint(1, length - 2, (1,), generator=g))
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "example_id": i})
    return out


class Probe(DistillationTrainer):
    seen: list = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.seen.append({"ids": inputs["example_id"].tolist(),
                              "counted": (inputs["labels"][:, 1:] != -100).sum(1).tolist(),
                              "num_items": int(num_items_in_batch)})
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def main(student_dir: str, teacher_dir: str, out: str, rows: str, batch: str, eval_rows: str) -> None:
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval().requires_grad_(False)
    args = TrainingArguments(output_dir=str(Path(out) / "run"), per_device_train_batch_size=int(batch),
                             per_device_eval_batch_size=int(batch),
                             num_train_epochs=1, learning_rate=1e-3, report_to="none", use_cpu=True,
                             train_sampling_strategy="sequential", remove_unused_columns=False, save_strategy="no",
                             logging_steps=1)
    objective = OBJECTIVE
    trainer = Probe(model=student, args=args, train_dataset=examples(int(rows)), data_collator=DistillCollator(0),
                    eval_dataset=examples(int(eval_rows)), objective=objective, teacher=teacher)
    Path(out, f"eval{os.environ['RANK']}.json").write_text(json.dumps(trainer.evaluate()))
    trainer.train()
    Path(out, f"rank{os.environ['RANK']}.json").write_text(json.dumps(Probe.seen))


if __name__ == "__main__":
    main(*sys.argv[1:])
