"""The real console script: init, run --stage test, seed flags reaching the run, one-line errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

LMDISTILL = shutil.which("lmdistill", path=str(Path(sys.executable).parent)) or "lmdistill"


def cli(*args, cwd=None, timeout=300):
    env = {**os.environ, "COLUMNS": "250", "TERMINAL_WIDTH": "250"}  # help tables unwrapped
    return subprocess.run([LMDISTILL, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env=env)


def test_help_lists_commands():
    out = cli("--help")
    assert out.returncode == 0
    for command in ("init", "run", "data"):
        assert command in out.stdout
    run_help = cli("run", "--help").stdout
    for flag in ("--teacher-model", "--teacher_model", "--domain-dataset", "--finance_dataset", "--medical_dataset",
                 "--vocab_chunk_size", "--start_stage", "--checkpoint_path", "--stage", "--bf16", "--no_cuda"):
        assert flag in run_help, flag


@pytest.mark.parametrize("preset", ["multistage", "strong-to-weak", "simple", "finetune"])
def test_init_writes_a_valid_commented_preset(preset, tmp_path):
    out_file = tmp_path / f"{preset}.yaml"
    out = cli("init", "--preset", preset, "-o", out_file)
    assert out.returncode == 0, out.stderr
    text = out_file.read_text()
    assert "#" in text and yaml.safe_load(text)["stages"]


def test_create_config_alias(tmp_path):
    out = cli("run", "--create_config", tmp_path / "s2w.yaml")
    assert out.returncode == 0, out.stderr
    assert "non_policy" in (tmp_path / "s2w.yaml").read_text()


def test_unknown_preset_and_bad_config_are_one_line_errors(tmp_path):
    out = cli("init", "--preset", "nope", "-o", tmp_path / "x.yaml")
    assert out.returncode == 1 and "unknown preset 'nope'" in out.stderr and "Traceback" not in out.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - name: a\n    temprature: 2\n")
    out = cli("run", bad)
    assert out.returncode == 1 and "stages[0].temprature: unknown key" in out.stderr
    assert "Traceback" not in out.stderr


def _config_file(tmp_path, teacher_dir, student_dir, text_jsonl, qa_jsonl, **stage):
    data = {"teacher": {"name": str(teacher_dir)}, "student": {"name": str(student_dir)},
            "data": {"max_length": 32, "sources": {"general": {"path": str(text_jsonl)}, "domain": {"path": str(qa_jsonl)}}},
            "training": {"report_to": [], "logging_steps": 1},
            "evaluation": {"measure_speed": False, "max_prompts": 4, "num_samples": 2},
            "generation": {"max_new_tokens": 4},
            "output_dir": str(tmp_path / "run"), "stages": [{"name": "s", "max_steps": 1, **stage}]}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_stage_test_prints_summary(tmp_path, teacher_dir, student_dir, text_jsonl, qa_jsonl):
    cfg = _config_file(tmp_path, teacher_dir, student_dir, text_jsonl, qa_jsonl)
    out = cli("run", cfg, "--stage", "test", "--output_dir", tmp_path / "elsewhere")
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    for needle in ("parameters", "vocab", "general", "domain", "estimated memory", "ok"):
        assert needle in text, needle


def test_stage_test_with_dash_and_underscore_model_flags(tmp_path, teacher_dir, student_dir, text_jsonl, qa_jsonl):
    cfg = _config_file(tmp_path, "missing-teacher", "missing-student", text_jsonl, qa_jsonl)
    out = cli("run", cfg, "--stage", "test", "--teacher-model", teacher_dir, "--student_model", student_dir)
    assert out.returncode == 0, out.stderr


def test_missing_model_path_is_one_line(tmp_path, student_dir, text_jsonl, qa_jsonl):
    cfg = _config_file(tmp_path, tmp_path / "no_such_teacher", student_dir, text_jsonl, qa_jsonl)
    out = cli("run", cfg, "--stage", "test")
    assert out.returncode == 1 and "does not exist" in out.stderr and "Traceback" not in out.stderr


def test_fp16_on_cpu_names_the_flag(tmp_path, teacher_dir, student_dir, text_jsonl, qa_jsonl):
    cfg = _config_file(tmp_path, teacher_dir, student_dir, text_jsonl, qa_jsonl)
    out = cli("run", cfg, "--fp16")
    assert out.returncode == 1 and "--fp16 needs a CUDA GPU" in out.stderr


def test_seed_flags_reach_the_run(tmp_path, teacher_dir, student_dir, text_jsonl, qa_jsonl):
    """Every override flag lands in the resolved config the run writes."""
    cfg = _config_file(tmp_path, teacher_dir, student_dir, text_jsonl, qa_jsonl)
    run_dir = tmp_path / "flagged"
    out = cli("run", cfg, "--output_dir", run_dir, "--general-dataset", text_jsonl, "--finance_dataset", qa_jsonl,
              "--eval_csv_path", qa_jsonl, "--num_samples", 40, "--max_length", 24, "--batch_size", 2,
              "--gradient_accumulation_steps", 2, "--optimizer", "sgd", "--learning_rate", "5e-4", "--weight_decay", 0.01,
              "--temperature", 3, "--warmup_ratio", 0.1, "--lr_scheduler_type", "linear", "--clip_grad_norm", 0.5,
              "--vocab_chunk_size", 16, "--save_every", 1, "--log_interval", 1, "--seed", 7, "--task_type", "causal",
              "--use_lora", "--no_cuda", "--bf16")
    assert out.returncode == 0, out.stderr[-3000:]
    resolved = yaml.safe_load((run_dir / "lmdistill_config.yaml").read_text())
    stage, training, data = resolved["stages"][0], resolved["training"], resolved["data"]
    assert data["sources"]["general"]["path"] == str(text_jsonl) and data["sources"]["domain"]["path"] == str(qa_jsonl)
    assert data["eval"]["eval"]["path"] == str(qa_jsonl) and data["sources"]["domain"]["max_rows"] == 40
    assert data["max_length"] == 24 and resolved["task_type"] == "causal"
    assert (stage["batch_size"], stage["gradient_accumulation_steps"], stage["learning_rate"]) == (2, 2, 5e-4)
    assert (stage["temperature"], stage["chunk_size"]) == (3.0, 16)
    assert (training["optimizer"], training["weight_decay"], training["warmup_ratio"]) == ("sgd", 0.01, 0.1)
    assert (training["lr_scheduler_type"], training["clip_grad_norm"], training["save_every"]) == ("linear", 0.5, 1)
    assert (training["logging_steps"], training["seed"], training["no_cuda"], training["bf16"]) == (1, 7, True, True)
    assert "lora" in resolved["student"]
    assert (run_dir / "s" / "checkpoint-1").exists()  # --save_every reached the Trainer


def test_eval_report_push_on_a_run(tmp_path, teacher_dir, student_dir, text_jsonl, qa_jsonl):
    cfg = _config_file(tmp_path, teacher_dir, student_dir, text_jsonl, qa_jsonl)
    data = yaml.safe_load(cfg.read_text())
    data["data"]["eval"] = {"domain": {"path": str(qa_jsonl), "max_rows": 8}}
    cfg.write_text(yaml.safe_dump(data))
    run_dir = tmp_path / "run"
    assert cli("run", cfg).returncode == 0
    (run_dir / "report.html").unlink()
    out = cli("report", run_dir)
    assert out.returncode == 0 and (run_dir / "report.html").exists()
    out = cli("eval", student_dir, "--data", qa_jsonl, "--teacher", teacher_dir, "--max-new-tokens", 4)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "perplexity/domain" in out.stdout and "top1_agreement/domain" in out.stdout
    out = cli("push", run_dir, "--repo-id", "me/tiny")
    assert out.returncode == 1 and "offline" in out.stderr.lower() and "Traceback" not in out.stderr


def test_data_command_json_and_errors(tmp_path, tokenizer_dir, qa_jsonl):
    out = cli("data", qa_jsonl, "--tokenizer", tokenizer_dir, "--max-length", 64, "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["format"].startswith("prompt") and summary["rows"] == 200 and summary["kept"] == 200
    assert "[[" in summary["example"]
    assert cli("data", qa_jsonl, "--tokenizer", tokenizer_dir).returncode == 0
    bad = tmp_path / "bad.json"
    bad.write_text('[{"text": "a"},')
    out = cli("data", bad, "--tokenizer", tokenizer_dir)
    assert out.returncode == 1 and "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) <= 2


def test_use_wandb_logs_offline(tmp_path, teacher_dir, student_dir, text_jsonl, qa_jsonl):
    cfg = _config_file(tmp_path, teacher_dir, student_dir, text_jsonl, qa_jsonl)
    env_dir = tmp_path / "wandb_home"
    out = subprocess.run([LMDISTILL, "run", str(cfg), "--use_wandb"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(env_dir)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert list(env_dir.rglob("*.wandb"))  # the offline run file W&B syncs later


def test_usage_errors_show_the_usage_not_a_traceback():
    """typer raises the exceptions of the click it vendors: they were not caught as click's and ended in a traceback."""
    for args, says in ((["demo", "--seeds", "0"], "Invalid value for '--seeds': Input should be greater than or equal "
                                                  "to 1"),
                       (["run", "--bogus"], "No such option: --bogus")):
        out = cli(*args)
        assert out.returncode == 2 and says in out.stderr and "Usage: lmdistill" in out.stderr, out.stderr[-2000:]
        assert "Traceback" not in out.stderr
