"""bf16: true on CPU: the student's forward under bf16 autocast, a bf16 teacher, float32 master weights and float32 loss
accumulation. The loss matches float32's within 1% relative (bf16 keeps 8 mantissa bits: ~0.4% per element, less
once averaged over tokens), on the logits path and on the fused one."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, TrainingArguments

from lmdistill.config import config_from_dict
from lmdistill.data.collate import DistillCollator
from lmdistill.losses import DistillObjective, LossTerm
from lmdistill.train.pipeline import run_pipeline
from lmdistill.train.trainer import DistillationTrainer

BF16_RTOL = 1e-2


def _examples(n=8):
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = torch.randint(5, 300, (16,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 4 + ids[4:], "example_id": i})
    return rows


def _train(student_dir, teacher_dir, tmp_path, bf16: bool, fused: bool):
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.bfloat16 if bf16 else torch.float32)
    head_dtypes = []
    student.lm_head.register_forward_hook(lambda m, i, out: head_dtypes.append(out.dtype))
    args = TrainingArguments(output_dir=str(tmp_path / f"bf16{bf16}fused{fused}"), per_device_train_batch_size=8,
                             max_steps=3, learning_rate=1e-3, lr_scheduler_type="constant", report_to="none",
                             use_cpu=True, bf16=bf16, remove_unused_columns=False, save_strategy="no", logging_steps=1)
    objective = DistillObjective([LossTerm("forward_kl", 0.7, {}), LossTerm("cross_entropy", 0.3, {})], temperature=2.0)
    trainer = DistillationTrainer(model=student, args=args, train_dataset=_examples(), data_collator=DistillCollator(0),
                                  objective=objective, teacher=teacher.eval().requires_grad_(False), fused=fused)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], student, head_dtypes


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
def test_bf16_loss_matches_float32_with_float32_master_weights(student_dir, teacher_dir, tmp_path, fused):
    ref, _, _ = _train(student_dir, teacher_dir, tmp_path, bf16=False, fused=fused)
    got, student, head_dtypes = _train(student_dir, teacher_dir, tmp_path, bf16=True, fused=fused)
    assert len(got) == len(ref) == 3
    for a, b in zip(got, ref):
        assert a == pytest.approx(b, rel=BF16_RTOL)
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    if not fused:  # the fused path skips the lm_head module: its matmul runs in the loss, in float32
        assert torch.bfloat16 in head_dtypes  # the student's forward really ran under bf16 autocast


def test_bf16_pipeline_runs_end_to_end_with_a_bf16_teacher(tiny_pipeline):
    stage = {"name": "kd", "max_steps": 3, "fused": True, "losses": [{"name": "forward_kl"}],
             "mixture": {"weights": {"general": 1.0}}}
    data = tiny_pipeline([stage])
    data["training"]["bf16"] = True
    config = config_from_dict(data)
    assert config.teacher.dtype == "bfloat16"  # not set: follows training.bf16
    run_dir = run_pipeline(config)
    history = json.loads((run_dir / "kd" / "log_history.json").read_text())
    assert all(math.isfinite(h["loss"]) for h in history if "loss" in h)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert all(math.isfinite(v) for v in metrics["student_after"].values())
    with safe_open(str(run_dir / "final" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


def test_a_teacher_dtype_that_is_set_wins_over_bf16(tiny_pipeline):
    data = tiny_pipeline([{"name": "kd", "max_steps": 1}])
    data["training"]["bf16"] = True
    data["teacher"]["dtype"] = "float32"
    assert config_from_dict(data).teacher.dtype == "float32"
