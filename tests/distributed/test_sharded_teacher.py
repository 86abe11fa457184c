"""A teacher sharded over two CPU processes (transformers' FSDP2 over gloo, `teacher.shard: always`) next to a DDP
student trains exactly like a whole teacher per process: same losses, same student, same metrics and samples,
while each process holds about half of the teacher.

accelerate enables FSDP for the *student* only from a multi-GPU state, so the student stays DDP here; the teacher's
sharding is ours (lmdistill.models.sharding) and runs on CPU as it does on GPUs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

PROBE = Path(__file__).with_name("ddp_probe.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
STEPS = 3


def _config(out: Path, teacher_dir, student_dir, qa_jsonl, shard: str) -> Path:
    cfg = {
        "teacher": {"name": str(teacher_dir), "shard": shard},
        "student": {"name": str(student_dir)},
        "data": {"max_length": 40, "sources": {"domain": {"path": str(qa_jsonl)}},
                 "eval": {"domain": {"path": str(qa_jsonl), "max_rows": 8}}},
        "training": {"batch_size": 4, "learning_rate": 3e-3, "logging_steps": 1, "report_to": [],
                     "lr_scheduler_type": "constant", "eval_batch_size": 4, "no_cuda": True},
        "generation": {"max_new_tokens": 4},
        "evaluation": {"num_samples": 2, "max_prompts": 4, "measure_speed": False, "report": False},
        "output_dir": str(out / "run"),
        "stages": [{"name": "kd", "max_steps": STEPS, "eval_steps": STEPS,
                    "losses": [{"name": "forward_kl", "weight": 0.7}, {"name": "cross_entropy", "weight": 0.2},
                               {"name": "feature", "weight": 0.1}]}],
    }
    path = out / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _launch(out: Path, cfg: Path) -> list[dict]:
    env = {**os.environ, "PROBE_DIR": str(out), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(TORCHRUN + [str(PROBE), "run", str(cfg)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads((out / f"probe-rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.multiprocess
def test_sharded_teacher_trains_like_a_whole_teacher(tmp_path, teacher_dir, student_dir, qa_jsonl):
    probes, runs = {}, {}
    for shard in ("never", "always"):
        out = tmp_path / shard
        out.mkdir()
        probes[shard] = _launch(out, _config(out, teacher_dir, student_dir, qa_jsonl, shard))
        runs[shard] = out / "run"

    # Memory: a whole teacher per process, or half of it (what a forward or a generation gathered is released).
    for probe in probes["never"]:
        held, total = probe["teacher_params"]
        assert held == total
    for probe in probes["always"]:
        held, total = probe["teacher_params"]
        assert held == total / 2

    # The same training: both processes agree, and the student equals the one trained beside whole teachers.
    assert probes["always"][0]["digest"] == probes["always"][1]["digest"]
    assert probes["always"][0]["digest"] == probes["never"][0]["digest"]
    # The feature term's projection is outside DDP: its gradients are averaged by the trainer, so it stays the same
    # on both processes (each saw different batches).
    for shard in ("never", "always"):
        assert probes[shard][0]["projections_digest"] == probes[shard][1]["projections_digest"]
    assert probes["always"][0]["projections_digest"] == probes["never"][0]["projections_digest"]

    def losses(run: Path) -> list:
        history = json.loads((run / "kd" / "log_history.json").read_text())
        return [value for h in history if "loss" in h
                for value in (h["step"], h["loss"], h["loss/forward_kl"], h["loss/feature"])]

    assert len(losses(runs["always"])) == 4 * STEPS
    assert losses(runs["always"]) == pytest.approx(losses(runs["never"]), rel=1e-6)

    # Scoring with the sharded teacher ran on both processes (its forwards are collective); rank 0 alone wrote.
    assert probes["always"][1]["writes"] == []
    metrics = {shard: json.loads((run / "metrics.json").read_text()) for shard, run in runs.items()}
    assert set(metrics["always"]) == {"teacher", "student_before", "student_after"}
    for role in ("teacher", "student_before", "student_after"):
        assert metrics["always"][role] == pytest.approx(metrics["never"][role], rel=1e-5)
    samples = {shard: (run / "samples.jsonl").read_text().splitlines() for shard, run in runs.items()}
    assert samples["always"] and samples["always"] == samples["never"]


@pytest.mark.multiprocess
def test_each_of_several_teachers_follows_its_own_shard_setting(tmp_path, teacher_dir, student_dir, qa_jsonl):
    """teachers: the first kept whole (shard: never), the second split over the two processes (shard: always): each
    process holds all of the first and half of the second, and the mixture trains the same student on both."""
    cfg = yaml.safe_load(_config(tmp_path, teacher_dir, student_dir, qa_jsonl, "never").read_text())
    del cfg["teacher"]
    cfg["teachers"] = [{"name": str(teacher_dir), "shard": "never"}, {"name": str(student_dir), "shard": "always"}]
    cfg["evaluation"]["enabled"] = False
    cfg["stages"][0].update(max_steps=2, losses=[{"name": "forward_kl"}])
    path = tmp_path / "teachers.yaml"
    path.write_text(yaml.safe_dump(cfg))
    probes = _launch(tmp_path, path)

    from transformers import AutoModelForCausalLM

    second = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(student_dir).parameters())
    for probe in probes:
        held, total = probe["teacher_params"]
        assert held == total - second / 2
    assert probes[0]["digest"] == probes[1]["digest"]
