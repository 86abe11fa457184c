"""Teachers that do not fit: 4-bit (nf4) through bitsandbytes on CPU, a clear error without it, own dtype."""

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainingArguments

from lmdistill.config import TeacherSettings
from lmdistill.data.collate import DistillCollator
from lmdistill.errors import ModelError
from lmdistill.losses import DistillObjective, LossTerm
from lmdistill.models.load import freeze, load_model
from lmdistill.train.stage import ListDataset
from lmdistill.train.trainer import DistillationTrainer

CPU = torch.device("cpu")


def _examples(tokenizer, n=8):
    ids = tokenizer("The bank reports strong growth this year.", add_special_tokens=False)["input_ids"]
    return [{"input_ids": ids[: 6 + i % 3], "labels": ids[: 6 + i % 3]} for i in range(n)]


def _train_steps(tmp_path, teacher, student_dir, tokenizer, steps=2):
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                             max_steps=steps, logging_steps=1, save_strategy="no", learning_rate=1e-3)
    trainer = DistillationTrainer(model=student, args=args, train_dataset=ListDataset(_examples(tokenizer)),
                                  data_collator=DistillCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                                  objective=DistillObjective([LossTerm("forward_kl")]), teacher=teacher)
    trainer.train()
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def test_four_bit_teacher_runs_on_cpu(tmp_path, teacher_dir, student_dir, tokenizer):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes (the `gpu` extra) is not installed")
    from bitsandbytes.nn import Linear4bit

    settings = TeacherSettings(name=str(teacher_dir), quantization={"bits": 4, "compute_dtype": "float32"})
    teacher = freeze(load_model(settings, "causal", device=CPU))
    quantized = [m for m in teacher.modules() if isinstance(m, Linear4bit)]
    assert len(quantized) == 4 * 7  # q, k, v, o, gate, up, down in each of the 4 layers
    assert quantized[0].weight.quant_type == "nf4"
    full = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    ids = torch.tensor([_examples(tokenizer)[0]["input_ids"]])
    with torch.no_grad():
        q_logits, f_logits = teacher(input_ids=ids).logits.float(), full(input_ids=ids).logits
    # nf4 keeps the teacher's predictions: logits strongly correlated with the full-precision ones
    corr = torch.corrcoef(torch.stack([q_logits.flatten(), f_logits.flatten()]))[0, 1]
    assert corr > 0.9, corr
    losses = _train_steps(tmp_path, teacher, student_dir, tokenizer)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_missing_bitsandbytes_names_the_gpu_extra(monkeypatch, teacher_dir):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(ModelError, match=r"quantization.bits=8 needs bitsandbytes: .*lmdistill\[gpu\]"):
        load_model(TeacherSettings(name=str(teacher_dir), quantization={"bits": 8}), "causal", device=CPU)


def test_teacher_dtype_is_its_own(tmp_path, teacher_dir, student_dir, tokenizer):
    teacher = freeze(load_model(TeacherSettings(name=str(teacher_dir), dtype="bfloat16"), "causal", device=CPU))
    assert next(teacher.parameters()).dtype == torch.bfloat16
    losses = _train_steps(tmp_path, teacher, student_dir, tokenizer, steps=1)
    assert len(losses) == 1 and torch.isfinite(torch.tensor(losses[0]))
