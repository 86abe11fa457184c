"""Out of memory in the teacher's forward pass or in the loss ends the run with one line naming the settings that
lower the memory of a step (simulated: the error is raised where the accelerator would raise it)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainingArguments

from lmdistill.data.collate import DistillCollator
from lmdistill.errors import TrainingError
from lmdistill.losses import DistillObjective, LossTerm
from lmdistill.train.trainer import DistillationTrainer

KNOBS = r"fused: true \(full logits never formed; chunk_size.*teacher_source: cache.*smaller batch_size with more gradient_accumulation_steps"


def _rows():
    return [{"input_ids": list(range(5, 17)), "labels": [-100] * 4 + list(range(9, 17)), "example_id": i}
            for i in range(4)]


def _trainer(student_dir, teacher_dir, tmp_path, objective):
    args = TrainingArguments(output_dir=str(tmp_path / "oom"), per_device_train_batch_size=2, max_steps=1,
                             report_to="none", use_cpu=True, remove_unused_columns=False, save_strategy="no",
                             per_device_eval_batch_size=2)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval().requires_grad_(False)
    return DistillationTrainer(model=AutoModelForCausalLM.from_pretrained(student_dir), args=args,
                               train_dataset=_rows(), eval_dataset=_rows(), data_collator=DistillCollator(0),
                               objective=objective, teacher=teacher)


def _out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


class _LossOutOfMemory(DistillObjective):
    __call__ = _out_of_memory


def test_teacher_forward_out_of_memory_names_the_knobs(student_dir, teacher_dir, tmp_path):
    trainer = _trainer(student_dir, teacher_dir, tmp_path, DistillObjective([LossTerm("forward_kl")]))
    trainer.teacher.forward = _out_of_memory
    for run in (trainer.train, trainer.evaluate):
        with pytest.raises(TrainingError, match=rf"^out of memory in the teacher's forward pass; .*{KNOBS}") as err:
            run()
        assert "\n" not in str(err.value) and isinstance(err.value.__cause__, torch.OutOfMemoryError)


def test_loss_out_of_memory_names_the_knobs(student_dir, teacher_dir, tmp_path):
    trainer = _trainer(student_dir, teacher_dir, tmp_path, _LossOutOfMemory([LossTerm("forward_kl")]))
    with pytest.raises(TrainingError, match=rf"^out of memory in the training step .*{KNOBS}"):
        trainer.train()
    with pytest.raises(TrainingError, match=rf"^out of memory in evaluation .*{KNOBS}"):
        trainer.evaluate()
