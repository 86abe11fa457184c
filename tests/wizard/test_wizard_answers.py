"""The wizard's questions in-process, with --yes and --set answers: what it writes and what it refuses."""

import io

import pytest
import yaml
from rich.console import Console

from lmdistill.errors import ConfigError
from lmdistill.wizard import number, output_dir, run_wizard


def _console() -> Console:
    return Console(file=io.StringIO(), width=200)


def _answers(tmp_path, model_dir, data, **more) -> dict:
    return {"model": str(model_dir), "dataset": str(data), "samples": "24", "eval_rows": "2", "epochs": "1",
            "output_dir": str(tmp_path / "out"), "config": str(tmp_path / "out.yaml"), "start": "n", **more}


def test_adalora_turns_epochs_into_steps_and_writes_without_running(tmp_path, student_dir, qa_jsonl):
    assert run_wizard(_console(), yes=True, defaults=_answers(tmp_path, student_dir, qa_jsonl, method="adalora")) is None
    config = yaml.safe_load((tmp_path / "out.yaml").read_text())
    stage = config["stages"][0]
    # 22 training rows (24 minus 2 held out), batch 4, 1 epoch: AdaLoRA needs its step count up front.
    assert stage["max_steps"] == 6 and "epochs" not in stage
    assert config["student"]["lora"]["method"] == "adalora"
    assert not (tmp_path / "out" / "final").exists()  # start=n: nothing trained


def test_qlora_loads_the_base_in_4bit(tmp_path, student_dir, qa_jsonl):
    run_wizard(_console(), yes=True, defaults=_answers(tmp_path, student_dir, qa_jsonl, method="2"))
    config = yaml.safe_load((tmp_path / "out.yaml").read_text())
    assert config["student"]["quantization"] == {"bits": 4} and config["student"]["lora"]["method"] == "qlora"


def test_separate_eval_set_keeps_the_training_source_and_its_limit(tmp_path, teacher_dir, student_dir, qa_jsonl,
                                                                   text_jsonl):
    console = _console()
    run_wizard(console, yes=True, defaults=_answers(
        tmp_path, student_dir, text_jsonl, approach="distill", teacher=str(teacher_dir), student=str(student_dir),
        eval_data=str(qa_jsonl), eval_rows="5"))
    config = yaml.safe_load((tmp_path / "out.yaml").read_text())
    assert config["data"]["sources"]["train"] == {"path": str(text_jsonl), "max_rows": 24}
    assert config["data"]["eval"]["eval"]["path"] == str(qa_jsonl) and config["evaluation"]["max_prompts"] == 5
    assert "ROUGE-L scores each model's continuation of the first half" in console.file.getvalue()  # plain text


def test_yes_with_a_bad_default_names_the_key_and_the_way_out(tmp_path, student_dir, teacher_dir, qa_jsonl):
    answers = _answers(tmp_path, student_dir, qa_jsonl, approach="2", teacher=str(teacher_dir),
                       student=str(student_dir), alpha="2")
    with pytest.raises(ConfigError, match=r"wizard answer alpha='2': 2.0 is out of range.*--set alpha=VALUE"):
        run_wizard(_console(), yes=True, defaults=answers)
    with pytest.raises(ConfigError, match="no such wizard question; the keys are approach, method"):
        run_wizard(_console(), yes=True, defaults={"teachr": "x"})


def test_teacher_and_student_of_different_kinds_are_refused(tmp_path, teacher_dir, t5_student_dir, qa_jsonl):
    answers = _answers(tmp_path, t5_student_dir, qa_jsonl, approach="2", teacher=str(teacher_dir),
                       student=str(t5_student_dir))
    with pytest.raises(ConfigError, match="the teacher is causal but .* is seq2seq"):
        run_wizard(_console(), yes=True, defaults=answers)


def test_parsers_say_why():
    with pytest.raises(ValueError, match=r"out of range: it must be in \(0, 20\]"):
        number(float, 0, 20, low_open=True)("0")
    assert number(int, 1, 8)("4.0") == 4


def test_output_dir_refuses_a_foreign_folder_and_accepts_a_run(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no lmdistill run"):
        output_dir(str(tmp_path / "other"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "lmdistill_config.yaml").write_text("stages: []")
    assert output_dir(str(tmp_path / "run")) == str(tmp_path / "run")


def test_rouge_table_shows_continuations_of_held_out_text(tmp_path):
    from lmdistill.eval.evaluate import write_metrics
    from lmdistill.wizard import rouge_table

    write_metrics(tmp_path, {"teacher": {"rouge_l_continuation": 0.5, "perplexity/heldout": 9.0},
                             "student_after": {"rouge_l_continuation": 0.25}})
    console = _console()
    console.print(rouge_table(tmp_path))
    out = console.file.getvalue()
    assert "rouge_l_continuation" in out and "0.2500" in out and "rouge_l " not in out and "perplexity" not in out


def test_other_answers_into_an_earlier_run_stop_naming_wizard_restart_which_starts_it_over(tmp_path, student_dir,
                                                                                          qa_jsonl, monkeypatch):
    from typer.testing import CliRunner

    import lmdistill.train.pipeline as pipeline
    from lmdistill.cli import app
    from lmdistill.config import load_config, save_config

    answers = _answers(tmp_path, student_dir, qa_jsonl, start="y")
    run_wizard(_console(), yes=True, defaults={**answers, "start": "n"})
    (tmp_path / "out").mkdir(exist_ok=True)
    save_config(load_config(tmp_path / "out.yaml"), tmp_path / "out" / pipeline.CONFIG_FILE)  # an earlier run's
    (tmp_path / "out" / "pipeline_state.json").write_text("{}")
    runs = []
    monkeypatch.setattr(pipeline, "run_pipeline",
                        lambda config, restart=False: runs.append(restart) or tmp_path / "out")
    with pytest.raises(ConfigError, match=r"out.yaml exists; give another name \(or delete it first, or start over "
                                          r"with --restart\)"):
        run_wizard(_console(), yes=True, defaults={**answers, "learning_rate": "1e-3"})
    with pytest.raises(ConfigError, match=r"out was run with other settings \(.*\); run `lmdistill wizard --restart` "
                                          r"to start it over with these answers, or give another output directory$"):
        run_wizard(_console(), yes=True, defaults={**answers, "learning_rate": "1e-3",
                                                   "config": str(tmp_path / "other.yaml")})
    assert runs == []
    flags = [arg for key, value in {**answers, "learning_rate": "1e-3"}.items() for arg in ("--set", f"{key}={value}")]
    result = CliRunner().invoke(app, ["wizard", "--yes", "--restart", *flags])
    assert result.exit_code == 0, result.output
    assert runs == [True]
    assert yaml.safe_load((tmp_path / "out.yaml").read_text())["training"]["learning_rate"] == 1e-3  # replaced


def test_other_split_answers_do_not_overwrite_an_earlier_runs_data(tmp_path, student_dir, qa_jsonl):
    """The held-out split files keep their paths whatever the answers, so the config compares equal: before, other
    samples / eval_rows answers silently rewrote the rows an earlier run (and its resume) trained on."""
    from lmdistill.config import load_config, save_config
    from lmdistill.config import CONFIG_FILE

    answers = _answers(tmp_path, student_dir, qa_jsonl)
    run_wizard(_console(), yes=True, defaults=answers)
    save_config(load_config(tmp_path / "out.yaml"), tmp_path / "out" / CONFIG_FILE)  # an earlier run's
    data = tmp_path / "out" / "data"
    before = {name: (data / name).read_text() for name in ("train.jsonl", "eval.jsonl")}
    other = {**answers, "samples": "20", "config": str(tmp_path / "other.yaml")}
    with pytest.raises(ConfigError, match=r"train.jsonl holds another split of the data .*: run `lmdistill wizard "
                                          r"--restart` to start it over with these answers, or give another output "
                                          r"directory$"):
        run_wizard(_console(), yes=True, defaults=other)
    assert {name: (data / name).read_text() for name in before} == before
    run_wizard(_console(), yes=True, defaults={**answers, "config": str(tmp_path / "same.yaml")})  # same split: ok
    run_wizard(_console(), yes=True, defaults={**other, "config": str(tmp_path / "third.yaml")}, restart=True)
    assert len((data / "train.jsonl").read_text().splitlines()) == 18  # 20 rows, 2 held out
