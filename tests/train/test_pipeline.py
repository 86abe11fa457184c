"""The multi-stage pipeline end to end on tiny models: outputs, loss falls, slices, resume after kill -9."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmdistill.config import config_from_dict
from lmdistill.train.pipeline import last_checkpoint, run_pipeline

KD = [{"name": "forward_kl", "weight": 0.8}, {"name": "cross_entropy", "weight": 0.2}]


def _losses(run_dir: Path, stage: str) -> list[float]:
    history = json.loads((run_dir / stage / "log_history.json").read_text())
    return [h["loss"] for h in history if "loss" in h]


def test_multistage_preset_runs_end_to_end(tiny_pipeline):
    from lmdistill.cli import preset_text

    preset = yaml.safe_load(preset_text("multistage"))
    for stage in preset["stages"]:
        stage.update(max_steps=8, learning_rate=3e-3, eval_steps=4, save_steps=4)
        stage.pop("epochs")
    data = tiny_pipeline(preset["stages"])
    data["data"]["eval"]["general"] = {"path": data["data"]["sources"]["general"]["path"], "max_rows": 8}  # both stage 3 sources
    run_dir = run_pipeline(config_from_dict(data))
    state = json.loads((run_dir / "pipeline_state.json").read_text())
    assert [s["status"] for s in state["stages"]] == ["done"] * 3
    for name in ("stage1", "stage2", "stage3"):
        for sub in ("best", "final"):
            assert (run_dir / name / sub / "model.safetensors").exists(), (name, sub)
        assert list((run_dir / name).glob("checkpoint-*"))
        losses = _losses(run_dir, name)
        assert losses[-1] < losses[0], (name, losses)
        history = json.loads((run_dir / name / "log_history.json").read_text())
        assert any("loss/forward_kl" in h for h in history)
    assert "loss/feature" in json.dumps(json.loads((run_dir / "stage2" / "log_history.json").read_text()))
    assert (run_dir / "lmdistill_config.yaml").exists()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"teacher", "student_before", "student_after"} <= set(metrics)
    assert (run_dir / "report.html").exists() and (run_dir / "samples.jsonl").exists()
    assert (run_dir / "final" / "README.md").exists() and (run_dir / "final" / "lmdistill_config.yaml").exists()
    assert list((run_dir / "stage3").glob("checkpoint-*/mixture_feedback.json"))  # evaluation-driven sampling ran
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    tok = AutoTokenizer.from_pretrained(run_dir / "final")
    out = final.generate(**tok("The bank", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert out.shape[1] > 2


def test_slice_starts_from_given_checkpoint(tiny_pipeline, tmp_path):
    stages = [{"name": "a", "max_steps": 2, "losses": KD}, {"name": "b", "max_steps": 2, "losses": KD}]
    config = config_from_dict(tiny_pipeline(stages))
    run_dir = run_pipeline(config, end_stage=1)
    state = json.loads((run_dir / "pipeline_state.json").read_text())
    assert [s["name"] for s in state["stages"]] == ["a"]
    other = config.model_copy(update={"output_dir": str(tmp_path / "other")})
    run_dir2 = run_pipeline(other, start_stage=2, checkpoint_path=str(run_dir / "a" / "best"))
    state2 = json.loads((run_dir2 / "pipeline_state.json").read_text())
    assert [s["name"] for s in state2["stages"]] == ["b"]
    assert (run_dir2 / "b" / "best" / "model.safetensors").exists()


def test_finetune_stage_needs_no_teacher(tiny_pipeline):
    stages = [{"name": "ft", "kind": "finetune", "max_steps": 3, "losses": [{"name": "cross_entropy"}]}]
    data = tiny_pipeline(stages)
    data.pop("teacher")
    data["student"]["lora"] = {"r": 4, "alpha": 8}
    data["training"]["report_to"] = ["tensorboard"]
    run_dir = run_pipeline(config_from_dict(data))
    assert list((run_dir / "ft").rglob("events.out.tfevents.*"))  # TensorBoard logs reached
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final")  # LoRA merged into plain weights
    assert not any("lora" in k for k in final.state_dict())


def test_lora_adapters_stay_trainable_in_next_stage(tiny_pipeline):
    stages = [{"name": "a", "max_steps": 2, "losses": KD}, {"name": "b", "max_steps": 2, "losses": KD}]
    data = tiny_pipeline(stages)
    data["student"]["lora"] = {"r": 4, "alpha": 8, "merge_on_save": False}
    run_dir = run_pipeline(config_from_dict(data))
    history_b = json.loads((run_dir / "b" / "log_history.json").read_text())
    assert (run_dir / "a" / "best" / "adapter_config.json").exists()
    assert any(h.get("grad_norm", 0) > 0 for h in history_b)  # adapters loaded from stage a got gradients
    from lmdistill.config import StudentSettings
    from lmdistill.models.load import apply_lora, load_student
    import torch

    s = StudentSettings(name=data["student"]["name"], lora=data["student"]["lora"])
    model = apply_lora(load_student(s, "causal", device=torch.device("cpu"), teacher=None,
                                    checkpoint=str(run_dir / "a" / "best")), s.lora, "causal")
    assert any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_student_from_teacher_layers_reloads(tiny_pipeline):
    stages = [{"name": "a", "max_steps": 2, "losses": KD}]
    data = tiny_pipeline(stages)
    data["student"] = {"from_teacher": {"num_layers": 2}}
    run_dir = run_pipeline(config_from_dict(data))
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert final.config.num_hidden_layers == 2 and len(final.model.layers) == 2


def _base_size(model) -> tuple[int, int]:
    """(decoder layers, parameters outside the LoRA adapters) of a plain or peft model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return len(base.model.layers), sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)


def test_layer_dropped_student_with_lora_stays_at_its_size_in_every_later_stage(tiny_pipeline, teacher_dir,
                                                                               monkeypatch):
    """The adapters' base is the layer-dropped student, not the teacher it was cut from: the next stage, best/ and
    final/ all hold 2 layers of the 4-layer teacher."""
    import lmdistill.train.pipeline as pipeline

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    dropped = sum(p.numel() for i in (1, 2) for p in teacher.model.layers[i].parameters())  # num_layers 2 keeps 0, 3
    expected = (2, sum(p.numel() for p in teacher.parameters()) - dropped)
    loaded = {}

    def spy(settings, task_type, *, checkpoint=None, **kw):
        model = load_student(settings, task_type, checkpoint=checkpoint, **kw)
        loaded[checkpoint] = _base_size(model)
        return model

    load_student = pipeline.load_student
    monkeypatch.setattr(pipeline, "load_student", spy)
    stages = [{"name": "a", "max_steps": 2, "losses": KD}, {"name": "b", "max_steps": 2, "losses": KD}]
    data = tiny_pipeline(stages, evaluation={"enabled": False, "report": False})
    data["student"] = {"from_teacher": {"num_layers": 2}, "lora": {"r": 2}}
    run_dir = run_pipeline(config_from_dict(data))
    assert loaded[str(run_dir / "a" / "best")] == expected  # stage b's start
    for folder in (run_dir / "a" / "best", run_dir / "b" / "best", run_dir / "final"):
        assert _base_size(AutoModelForCausalLM.from_pretrained(folder)) == expected, folder
    assert (run_dir / "final" / "model.safetensors").exists()  # merged, not an adapter folder over the teacher


def test_resume_after_sigkill(tiny_pipeline, tmp_path):
    stages = [{"name": "a", "max_steps": 2, "losses": KD},
              {"name": "b", "max_steps": 120, "save_steps": 2, "losses": KD}]
    data = tiny_pipeline(stages)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(data))
    run_dir = Path(data["output_dir"])
    cmd = [sys.executable, "-m", "lmdistill.cli", "run", str(cfg)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    # Any complete checkpoint of stage b (rotation deletes older ones, so do not wait for a particular step); one whose
    # trainer_state.json is still being written is not complete, and the resumed run would rightly pass it over.
    while time.time() < deadline and last_checkpoint(run_dir / "b") is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    state = json.loads((run_dir / "pipeline_state.json").read_text())
    assert state["stages"][0]["status"] == "done" and state["stages"][1]["status"] == "running"
    a_best = run_dir / "a" / "best" / "model.safetensors"
    a_mtime = a_best.stat().st_mtime
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    state = json.loads((run_dir / "pipeline_state.json").read_text())
    assert [s["status"] for s in state["stages"]] == ["done", "done"]
    assert a_best.stat().st_mtime == a_mtime  # finished stage untouched
    steps = [h["step"] for h in json.loads((run_dir / "b" / "log_history.json").read_text()) if "loss" in h]
    assert steps[-1] == 120 and steps == sorted(set(steps))  # each step once: continued, not restarted
    assert "resuming from" in done.stderr


def test_epochs_are_counted_once_logged_as_epochs_and_evaluated_each(tiny_pipeline):
    """2 epochs over 40 rows at batch 4 is 20 optimizer steps, not 2 x 2 epochs; the log counts epochs over the rows,
    and with no eval_steps the stage is evaluated (and saved) at the end of each epoch."""
    data = tiny_pipeline([{"name": "a", "epochs": 2, "losses": KD, "mixture": {"weights": {"domain": 1.0}}}])
    data["data"]["sources"]["domain"]["max_rows"] = 40
    data["evaluation"] = {"enabled": False, "num_samples": 0}
    run_dir = run_pipeline(config_from_dict(data))
    history = json.loads((run_dir / "a" / "log_history.json").read_text())
    steps = [h["step"] for h in history if "loss" in h]
    assert steps[-1] == 20
    epochs = {h["step"]: h["epoch"] for h in history if "loss" in h}
    assert epochs[5] == 0.5 and epochs[10] == 1.0 and epochs[20] == 2.0
    assert [h["step"] for h in history if "eval_loss" in h] == [10, 20]
    assert sorted(p.name for p in (run_dir / "a").glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-20"]


def test_load_data_maps_columns_and_reads_the_tokenised_cache_on_a_rerun(tiny_pipeline, tokenizer, tmp_path, caplog):
    import logging

    from lmdistill.train.prepare import load_data

    data = tiny_pipeline([{"name": "kd", "losses": KD}])["data"]
    fixture = Path(__file__).parents[1] / "data" / "fixtures" / "context_target.jsonl"
    data["sources"] = {"fin": {"path": str(fixture),
                               "columns": {"prompt": "context", "response": "target"}}}
    data.update({"eval": {}, "cache_dir": str(tmp_path / "cache"), "train_on": "last_assistant"})
    config = config_from_dict(tiny_pipeline([{"name": "kd", "losses": KD}], data=data))
    with caplog.at_level(logging.INFO, logger="lmdistill.data.cache"):
        first, _, report = load_data(config, tokenizer, "causal")
        again, _, _ = load_data(config, tokenizer, "causal")
    assert report["fin"]["format"] == "prompt_response" and report["fin"]["kept"] == 2
    assert again == first and len(first["fin"]) == 2
    assert "source fin: tokenisation cache miss" in caplog.text and "source fin: tokenisation cache hit" in caplog.text
