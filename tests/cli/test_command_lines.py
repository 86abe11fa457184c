"""The command lines of run_distillation.py (three stages) and llm_kd.py (one stage), typed as their READMEs show
them, with no config file: the flags alone say which models and data are used, and nothing else is."""

import ast
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lmdistill.cli import PRESETS, _preset_dict, app
from lmdistill.config import config_from_dict, save_config
from lmdistill.errors import ConfigError
from lmdistill.overrides import apply_overrides, flags_only_config, preset_for_flags
from lmdistill.config import CONFIG_FILE

from test_cli import cli

SMALL = ("--num_samples", 24, "--max_length", 32, "--no_cuda")


def _draws(stderr: str) -> list[list[str]]:
    """The sources each stage drew from, as its start line logs them."""
    return [ast.literal_eval(line.split(" draws from ")[1].split("]")[0] + "]") for line in stderr.splitlines()
            if " draws from " in line]


def test_three_stage_command_line_without_a_config(tmp_path, teacher_dir, student_dir, text_jsonl, qa_jsonl):
    run_dir = tmp_path / "qwen_finance_model"
    out = cli("run", "--teacher_model", teacher_dir, "--student_model", student_dir, "--output_dir", run_dir,
              "--general_dataset", text_jsonl, "--finance_dataset", qa_jsonl, "--use_lora", "--start_stage", 1,
              "--end_stage", 3, "--batch_size", 4, "--gradient_accumulation_steps", 1, *SMALL)
    assert out.returncode == 0, out.stderr[-3000:]
    resolved = yaml.safe_load((run_dir / "lmdistill_config.yaml").read_text())
    sources = resolved["data"]["sources"]
    assert {name: src["path"] for name, src in sources.items()} == {"general": str(text_jsonl), "domain": str(qa_jsonl)}
    assert resolved["data"].get("eval", {}) == {} and "lora" in resolved["student"]
    draws = _draws(out.stderr)  # each stage draws only from the sources the flags named
    assert len(draws) == 3 and draws[0] == ["general"] and set().union(*draws) == {"general", "domain"}
    assert "held out 1 rows of general, 1 rows of domain" in " ".join(out.stderr.split())
    state = json.loads((run_dir / "pipeline_state.json").read_text())
    assert [s["status"] for s in state["stages"]] == ["done"] * 3
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"perplexity/general", "perplexity/domain"} <= set(metrics["student_after"])
    assert "5% of the rows of each training source (general, domain), held out and never trained on" in \
        (run_dir / "report.html").read_text()


def test_one_stage_command_line_without_a_config(tmp_path, teacher_dir, student_dir, text_jsonl):
    run_dir = tmp_path / "distilled_model"
    out = cli("run", "--teacher_model", teacher_dir, "--student_model", student_dir, "--task_type", "causal",
              "--dataset", text_jsonl, "--output_dir", run_dir, "--epochs", 1, *SMALL)
    assert out.returncode == 0, out.stderr[-3000:]
    resolved = yaml.safe_load((run_dir / "lmdistill_config.yaml").read_text())
    assert {name: src["path"] for name, src in resolved["data"]["sources"].items()} == {"train": str(text_jsonl)}
    assert resolved["task_type"] == "causal" and [s["name"] for s in resolved["stages"]] == ["distill"]
    assert _draws(out.stderr) == [["train"]]
    assert "wikitext" not in (run_dir / "lmdistill_config.yaml").read_text()


@pytest.mark.parametrize("flags, message", [
    ({"general_dataset": "g"}, "need both --general_dataset and --domain_dataset"),
    ({"medical_dataset": "m"}, "only the domain data was given"),
    ({"dataset": "x", "general_dataset": "g"}, "give one or the other"),
    ({}, "no training data: without a config file pass --dataset"),
])
def test_data_flags_without_a_config_choose_the_pipeline_or_say_what_is_missing(flags, message):
    flags = {"domain_dataset": flags.pop("medical_dataset")} if "medical_dataset" in flags else flags
    with pytest.raises(ConfigError, match=message):
        preset_for_flags(flags)


def test_models_must_be_named_without_a_config():
    with pytest.raises(ConfigError, match="name the models: --student_model"):
        flags_only_config(_preset_dict("simple"), {"teacher_model": "T", "dataset": "x"})


def test_a_source_flag_the_config_lacks_is_an_error():
    """With the simple preset's single source, --general_dataset would add a source the stage also samples."""
    with pytest.raises(ConfigError, match="--general_dataset sets the source 'general', but the config's sources"):
        apply_overrides(_preset_dict("simple"), {"general_dataset": "g.jsonl"})


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_init_configs_use_only_the_data_the_flags_name(preset):
    """Each preset, as `lmdistill init` writes it, once the flags name models and data: every data path is one the
    user gave (no placeholder eval file, no hub dataset), and it validates."""
    flags = {"teacher_model": "T", "student_model": "S", "output_dir": "O"}
    if preset == "multistage":
        flags |= {"general_dataset": "g.jsonl", "domain_dataset": "d.jsonl"}
    else:
        flags |= {"dataset": "x.jsonl"}
    config = config_from_dict(apply_overrides(_preset_dict(preset), flags))
    paths = {src.path for group in (config.data.sources, config.data.eval) for src in group.values()}
    assert paths == ({"g.jsonl", "d.jsonl"} if preset == "multistage" else {"x.jsonl"})


def test_init_config_with_the_flags_loads_and_reports_the_held_out_rows(tmp_path, teacher_dir, student_dir,
                                                                       text_jsonl, qa_jsonl):
    """The multistage config `init` writes, completed by the flags: `--stage test` loads it and shows the rows
    held out for evaluation."""
    from rich.console import Console

    from lmdistill.train.summary import print_summary

    flags = {"teacher_model": str(teacher_dir), "student_model": str(student_dir), "general_dataset": str(text_jsonl),
             "domain_dataset": str(qa_jsonl), "output_dir": str(tmp_path / "o"), "num_samples": 40, "max_length": 32}
    console = Console(record=True, width=200)
    print_summary(config_from_dict(apply_overrides(_preset_dict("multistage"), flags)), console)
    text = console.export_text()
    assert "held out for eval" in text and "ok" in text
    rows = [[cell.strip() for cell in line.split("│")] for line in text.splitlines() if "prompt_completion" in line
            or "│ general" in line]
    assert [row[6] for row in rows] == ["2", "2"]  # 5% of 40 rows of each source


def test_cli_names_the_changed_flag_before_loading_anything(tmp_path):
    config = config_from_dict({"output_dir": str(tmp_path / "run"), "stages": [{"name": "a", "max_steps": 1}]})
    cfg = tmp_path / "c.yaml"
    save_config(config, cfg)
    Path(config.output_dir).mkdir()
    save_config(config, Path(config.output_dir) / CONFIG_FILE)
    (Path(config.output_dir) / "pipeline_state.json").write_text("{}")  # the earlier run trained: the folder is bound
    result = CliRunner().invoke(app, ["run", str(cfg), "--learning_rate", "3e-4"])
    assert isinstance(result.exception, ConfigError)
    assert "stages[0].learning_rate: (unset) -> 0.0003" in str(result.exception)
    assert "--restart" in str(result.exception)


def test_create_config_refuses_to_overwrite(tmp_path):
    target = tmp_path / "distillation_config.yaml"
    target.write_text("# my edits\n")
    out = cli("run", "--create_config", target)
    assert out.returncode == 1 and "exists; choose another file name or remove it" in out.stderr
    assert target.read_text() == "# my edits\n"


def test_push_takes_the_token_its_error_suggests(tmp_path, monkeypatch):
    """A refused token: the error's hint names --token, and --token is what reached the Hub."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from huggingface_hub import constants
    from typer.testing import CliRunner

    from lmdistill.cli import app

    seen = []

    class Unauthorized(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's naming)
            seen.append(self.headers.get("authorization"))
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "config.json").write_text("{}")
    server = HTTPServer(("127.0.0.1", 0), Unauthorized)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    try:
        result = CliRunner().invoke(app, ["push", str(tmp_path), "--repo-id", "me/tiny", "--token", "hf_bad"])
    finally:
        server.shutdown()
    assert seen and seen[0] == "Bearer hf_bad"
    assert "pass --token" in str(result.exception)
