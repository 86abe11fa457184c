"""deepspeed_teacher for real: 2 CPU processes, each holding half of the teacher, computing what a whole copy computes.

Skipped where deepspeed is not installed (lmdistill does not depend on it, and CI lacks it). To run it:
    python3 -m venv /tmp/dsvenv
    /tmp/dsvenv/bin/pip install -c constraints.txt torch==2.13.0+cpu
    DS_BUILD_OPS=0 /tmp/dsvenv/bin/pip install -c constraints.txt -e .[dev] deepspeed
    /tmp/dsvenv/bin/python -m pytest -q tests/distributed/test_deepspeed_cpu.py
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"),
]

CHECK = Path(__file__).with_name("deepspeed_cpu_check.py")
ACCELERATE_ZERO3 = Path(__file__).parents[2] / "examples" / "accelerate" / "deepspeed_zero3.yaml"


def test_zero3_teacher_is_split_over_two_cpu_processes_and_computes_the_same_logits(tmp_path):
    env = {**os.environ, "CHECK_DIR": str(tmp_path), "DS_ACCELERATOR": "cpu", "ACCELERATE_USE_DEEPSPEED": "true",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(CHECK), "engine"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    for rank, result in enumerate(results):
        assert result["rank"] == rank and result["world_size"] == 2
        assert result["distributed_type"] == "DistributedType.DEEPSPEED"
        for precision, dtype in (("float32", "torch.float32"), ("bf16", "torch.bfloat16")):
            teacher = result[precision]
            # Each process holds its own half of every parameter, and no whole weight outside a forward pass.
            assert teacher["even_split"] and teacher["placeholders_empty"]
            assert abs(teacher["local"] - teacher["total"] / 2) <= 16  # per-parameter padding to an even split
            assert teacher["dtypes"] == [dtype]
            assert not teacher["training"] and not teacher["requires_grad"]
        # Gathered weights are the whole model's: float32 logits are bit-identical to an unsharded copy's, bf16
        # ones equal the same model cast to bf16 up to bf16 rounding of different reduction orders.
        assert results[rank]["float32"]["max_abs_diff"] == 0.0
        assert results[rank]["bf16"]["max_abs_diff"] <= 1e-2


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, teacher_dir, student_dir, qa_jsonl):
    """`lmdistill run` under accelerate launch with examples/accelerate/deepspeed_zero3.yaml made for 2 CPU processes."""
    tmp = tmp_path_factory.mktemp("zero3_run")
    launch = yaml.safe_load(ACCELERATE_ZERO3.read_text())
    launch["use_cpu"] = True
    (tmp / "zero3_cpu.yaml").write_text(yaml.safe_dump(launch))
    config = {
        "teacher": {"name": str(teacher_dir)},
        "student": {"name": str(student_dir)},
        "data": {"max_length": 40, "sources": {"domain": {"path": str(qa_jsonl)}},
                 "eval": {"domain": {"path": str(qa_jsonl), "max_rows": 8}}},
        "training": {"batch_size": 4, "learning_rate": 3e-3, "logging_steps": 1, "report_to": [],
                     "lr_scheduler_type": "constant", "eval_batch_size": 8, "no_cuda": True},
        "generation": {"max_new_tokens": 4},
        "evaluation": {"num_samples": 2, "report": False},
        "output_dir": str(tmp / "run"),
        "stages": [{"name": "kd", "max_steps": 4, "losses": [{"name": "forward_kl", "weight": 0.8},
                                                              {"name": "cross_entropy", "weight": 0.2}]}],
    }
    (tmp / "run.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp / "zero3_cpu.yaml"),
           "--main_process_port", "0", str(CHECK), "run", str(tmp / "run.yaml")]
    env = {**os.environ, "CHECK_DIR": str(tmp), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    return tmp, proc


def test_trainer_under_zero3_partitions_teacher_and_student_and_learns(zero3_run):
    tmp, proc = zero3_run
    records = [json.loads((tmp / f"run-rank{r}.json").read_text()) for r in (0, 1)]
    for record in records:
        assert record["world_size"] == 2 and record["distributed_type"] == "DistributedType.DEEPSPEED"
        # The trainer handed the teacher to deepspeed_teacher: it is split like the student, half per process.
        for model in ("teacher", "student"):
            assert record[model]["even_split"], record
            assert abs(record[model]["local"] - record[model]["total"] / 2) <= 64
        assert len(record["losses"]) == 4 and record["losses"][-1] < record["losses"][0]
    assert records[0]["losses"] == records[1]["losses"]  # one loss over both processes' batches


def test_whole_run_under_zero3_completes_and_exports_a_whole_student(zero3_run):
    tmp, proc = zero3_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for folder in ("final", "kd/best"):
        student = AutoModelForCausalLM.from_pretrained(tmp / "run" / folder)
        assert all(p.numel() > 0 for p in student.parameters())
    # best/ is the model alone: DeepSpeed's optimizer shards stay in the checkpoint.
    assert not list((tmp / "run" / "kd" / "best").glob("global_step*"))
