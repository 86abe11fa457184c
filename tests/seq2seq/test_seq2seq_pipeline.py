"""A tiny T5 teacher distills into a smaller T5 student through the real CLI; the result is a seq2seq model."""

import json

import yaml
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
from typer.testing import CliRunner

from lmdistill.cli import app
from lmdistill.models.load import detect_task_type

STAGE = {"name": "kd", "max_steps": 10, "losses": [{"name": "forward_kl", "weight": 0.7},
                                                   {"name": "cross_entropy", "weight": 0.3}]}


def test_task_type_is_detected_from_the_model_config(t5_student_dir, student_dir):
    assert detect_task_type(str(t5_student_dir)) == "seq2seq"
    assert detect_task_type(str(student_dir)) == "causal"


def test_t5_teacher_distills_into_smaller_t5(t5_pipeline, tmp_path):
    cfg = tmp_path / "s2s.yaml"
    cfg.write_text(yaml.safe_dump(t5_pipeline([STAGE])))
    result = CliRunner().invoke(app, ["run", str(cfg), "--task_type", "seq2seq"])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "run"

    saved = yaml.safe_load((run_dir / "lmdistill_config.yaml").read_text())
    assert saved["task_type"] == "seq2seq"
    history = json.loads((run_dir / "kd" / "log_history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 10 and sum(losses[-3:]) < sum(losses[:3]), losses
    assert any("loss/forward_kl" in h for h in history)

    state = json.loads((run_dir / "pipeline_state.json").read_text())
    assert [s["status"] for s in state["stages"]] == ["done"]

    # Generation-based evaluation: encoder inputs are the prompts, decoder labels the references.
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for role in ("teacher", "student_before", "student_after"):
        assert {"perplexity/pairs", "rouge_l", "tokens_per_s/batch1"} <= set(metrics[role]), (role, metrics[role])
    assert metrics["student_after"]["perplexity/pairs"] < metrics["student_before"]["perplexity/pairs"]
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and samples[0]["prompt"].startswith("What does")

    final = AutoModelForSeq2SeqLM.from_pretrained(run_dir / "final")
    assert final.config.num_layers == 1 and final.config.d_model == 64
    tok = AutoTokenizer.from_pretrained(run_dir / "final")
    out = final.generate(**tok(["What does the bank report?"], return_tensors="pt"), max_new_tokens=4,
                         do_sample=False)
    assert out.shape[1] > 1
