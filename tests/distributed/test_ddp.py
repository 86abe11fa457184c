"""Two training processes on CPU (DDP over gloo), launched by torchrun or by accelerate launch with the shipped
examples/accelerate/ddp.yaml, through the same `lmdistill run` (training.no_cuda: true selects gloo).

Not tested here: `accelerate launch --cpu --num_processes 2` (it silently starts ONE process; see
docs/distributed.md), FSDP and DeepSpeed (accelerate enables them only on GPUs)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ddp_probe import weights_digest

PROBE = Path(__file__).with_name("ddp_probe.py")
ACCELERATE_DDP = Path(__file__).parents[2] / "examples" / "accelerate" / "ddp.yaml"
LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_DDP),
                   "--main_process_port", "0"],
}
BATCH, STEPS = 4, 4


def _config(tmp_path, teacher_dir, student_dir, qa_jsonl, fused: bool) -> Path:
    cfg = {
        "teacher": {"name": str(teacher_dir)},
        "student": {"name": str(student_dir)},
        "data": {"max_length": 40, "sources": {"domain": {"path": str(qa_jsonl)}},
                 "eval": {"domain": {"path": str(qa_jsonl), "max_rows": 8}}},
        "training": {"batch_size": BATCH, "learning_rate": 3e-3, "logging_steps": 1, "report_to": [],
                     "lr_scheduler_type": "constant", "eval_batch_size": 8, "no_cuda": True},
        "generation": {"max_new_tokens": 4},
        "evaluation": {"num_samples": 2, "report": False},
        "output_dir": str(tmp_path / "run"),
        "stages": [{"name": "kd", "max_steps": STEPS, "fused": fused, "losses": [{"name": "forward_kl", "weight": 0.8},
                                                                  {"name": "cross_entropy", "weight": 0.2}]}],
    }
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.multiprocess
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_processes_shard_data_and_agree_on_the_student(launcher, tmp_path, teacher_dir, student_dir, qa_jsonl):
    # The torchrun run uses the fused loss (its forward must still pass through DDP's wrapper), the other one logits.
    cfg = _config(tmp_path, teacher_dir, student_dir, qa_jsonl, fused=launcher == "torchrun")
    env = {**os.environ, "PROBE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    cmd = LAUNCHERS[launcher] + [str(PROBE), "run", str(cfg)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    probes = [json.loads((tmp_path / f"probe-rank{r}.json").read_text()) for r in (0, 1)]

    # Two processes really trained together (not two single-process runs, not one run).
    for probe in probes:
        assert probe["world_size"] == 2 and probe["trainer_processes"] == 2

    # The stage's dataset was drawn for both processes, and each took its own batches of it: together the
    # processes read it exactly once, rank 0 the even batches and rank 1 the odd ones.
    dataset = probes[0]["dataset"]
    assert probes[1]["dataset"] == dataset and len(dataset) == BATCH * STEPS * 2
    batches = [dataset[i:i + BATCH] for i in range(0, len(dataset), BATCH)]
    assert probes[0]["batches"] == batches[0::2] and probes[1]["batches"] == batches[1::2]
    assert probes[0]["batches"] != probes[1]["batches"]

    # DDP kept the replicas identical, and the saved student is that same model.
    run_dir = tmp_path / "run"
    assert probes[0]["digest"] == probes[1]["digest"]
    assert weights_digest(load_file(run_dir / "kd" / "final" / "model.safetensors")) == probes[0]["digest"]

    # Only the main process wrote the run's files.
    assert probes[1]["writes"] == []
    assert {"config", "state", "final", "best", "export"} <= set(probes[0]["writes"])
    state = json.loads((run_dir / "pipeline_state.json").read_text())
    assert [s["status"] for s in state["stages"]] == ["done"]
    history = json.loads((run_dir / "kd" / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == list(range(1, STEPS + 1))
    assert "student_after" in json.loads((run_dir / "metrics.json").read_text())
    assert AutoModelForCausalLM.from_pretrained(run_dir / "final").config.num_hidden_layers == 2


@pytest.mark.multiprocess
def test_a_nonfinite_loss_on_one_process_skips_the_step_on_both(tmp_path, teacher_dir, student_dir, qa_jsonl):
    """Process 1 alone sees a NaN loss at the second step: both processes skip that step together (no hang in the
    gradient sync, no replica stepping alone) and training goes on."""
    cfg = _config(tmp_path, teacher_dir, student_dir, qa_jsonl, fused=False)
    env = {**os.environ, "PROBE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1", "PROBE_NAN": "1:1"}
    proc = subprocess.run(LAUNCHERS["torchrun"] + [str(PROBE), "run", str(cfg)], env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    probes = [json.loads((tmp_path / f"probe-rank{r}.json").read_text()) for r in (0, 1)]
    assert probes[1]["nan_steps"] == 1 and "nan_steps" not in probes[0]
    assert probes[0]["skipped"] == probes[1]["skipped"] == [False, True] + [False] * (STEPS - 2)
    assert probes[0]["digest"] == probes[1]["digest"]
    history = json.loads((tmp_path / "run" / "kd" / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == list(range(1, STEPS + 1))
