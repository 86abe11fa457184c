"""Chained stages (a stage's teacher is an earlier stage's student, its student cut from that teacher) and
self-distillation from an EMA of the student, through `lmdistill run` and the pipeline."""

import json
import logging

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerState
from typer.testing import CliRunner

from lmdistill.cli import app, preset_text
from lmdistill.config import config_from_dict
from lmdistill.errors import ConfigError
from lmdistill.train.ema import EMA_FILE
from lmdistill.train.pipeline import run_pipeline

KD = [{"name": "forward_kl", "weight": 0.9}, {"name": "cross_entropy", "weight": 0.1}]


def test_progressive_preset_runs_through_the_cli(tiny_pipeline, tmp_path, caplog):
    """The preset's three stages on the 4-layer tiny teacher: 3 -> 2 -> 1 layers, each from the one before."""
    preset = yaml.safe_load(preset_text("progressive"))
    depths = [3, 2, 1]
    for stage, depth in zip(preset["stages"], depths):
        stage.pop("epochs")
        stage.update(max_steps=2, learning_rate=3e-3)
        if "student" in stage:
            stage["student"]["from_teacher"]["num_layers"] = depth
    data = tiny_pipeline(preset["stages"], evaluation={"enabled": False})
    data["student"] = {"from_teacher": {"num_layers": depths[0]}}
    path = tmp_path / "progressive.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "run"
    state = json.loads((run_dir / "pipeline_state.json").read_text())
    assert [s["status"] for s in state["stages"]] == ["done"] * 3
    for stage, depth in zip(("stage1", "stage2", "stage3"), depths):
        for sub in ("best", "final"):
            model = AutoModelForCausalLM.from_pretrained(run_dir / stage / sub)
            assert model.config.num_hidden_layers == depth, (stage, sub)
    cut = AutoModelForCausalLM.from_pretrained(run_dir / "stage2" / "student_init")
    assert cut.config.num_hidden_layers == 2
    assert AutoModelForCausalLM.from_pretrained(run_dir / "final").config.num_hidden_layers == 1


def test_a_chain_names_earlier_stages_only(tiny_pipeline):
    with pytest.raises(ConfigError, match="stage .a. takes its teacher from stage .b., which is not an earlier stage"):
        config_from_dict(tiny_pipeline([{"name": "a", "teacher": {"from_stage": "b"}}, {"name": "b"}]))
    with pytest.raises(ConfigError, match="exactly one of from_stage"):
        config_from_dict(tiny_pipeline([{"name": "a"}, {"name": "b", "teacher": {"from_stage": "a", "self": "ema"}}]))
    with pytest.raises(ConfigError, match="remove student.lora for chained runs"):
        config_from_dict(tiny_pipeline([{"name": "a"}, {"name": "b", "teacher": {"from_stage": "a"},
                                                        "student": {"from_teacher": {"num_layers": 1}}}],
                                       student={"name": "x", "lora": {}}))
    with pytest.raises(ConfigError, match="set teacher_source: live and fused: false"):
        config_from_dict(tiny_pipeline([{"name": "a", "fused": True, "teacher": {"self": "ema"}}]))


def test_ema_self_distillation_resumes_with_the_same_average(tiny_pipeline, tmp_path, monkeypatch, caplog):
    stages = [{"name": "self", "max_steps": 4, "save_steps": 2, "losses": KD,
               "teacher": {"self": "ema", "decay": 0.5}}]

    def run(out):
        data = tiny_pipeline(stages, output_dir=str(out), evaluation={"enabled": False})
        del data["teacher"]  # self-distillation needs no other model
        return run_pipeline(config_from_dict(data))

    with caplog.at_level(logging.INFO):
        whole = run(tmp_path / "whole")
    assert "stage self: teachers resident: none; this stage distils from an EMA of the student" in caplog.text
    saved_at_4 = load_file(whole / "self" / "checkpoint-4" / EMA_FILE)
    student = load_file(whole / "self" / "checkpoint-4" / "model.safetensors")
    name = next(k for k in saved_at_4 if k.endswith("mlp.up_proj.weight"))
    first = load_file(whole / "self" / "checkpoint-2" / EMA_FILE)
    assert not torch.equal(saved_at_4[name], first[name]) and not torch.equal(saved_at_4[name], student[name])

    # Killed the moment checkpoint-2 counts as complete for resume (its trainer_state.json written), as a SIGKILL
    # that waits for a complete checkpoint lands: the average must already be in it.
    save = TrainerState.save_to_json

    def save_then_die(self, path):
        save(self, path)
        if self.global_step == 2:
            raise KeyboardInterrupt("killed once the step-2 checkpoint is complete")

    monkeypatch.setattr(TrainerState, "save_to_json", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut")
    monkeypatch.setattr(TrainerState, "save_to_json", save)
    with caplog.at_level(logging.INFO):
        resumed = run(tmp_path / "cut")
    assert "resuming from" in caplog.text and "holds no EMA teacher" not in caplog.text
    again = load_file(resumed / "self" / "checkpoint-4" / EMA_FILE)
    assert again.keys() == saved_at_4.keys()
    for key in saved_at_4:
        torch.testing.assert_close(again[key], saved_at_4[key], atol=1e-6, rtol=1e-5)
    assert not (resumed / "self" / "best" / EMA_FILE).exists()
