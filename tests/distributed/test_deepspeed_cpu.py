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

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"),
]

CHECK = Path(__file__).with_name("deepspeed_cpu_check.py")


def test_zero3_teacher_is_split_over_two_cpu_processes_and_computes_the_same_logits(tmp_path):
    env = {**os.environ, "CHECK_DIR": str(tmp_path), "DS_ACCELERATOR": "cpu", "ACCELERATE_USE_DEEPSPEED": "true",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(CHECK)]
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
