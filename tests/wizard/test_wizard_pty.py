"""`lmdistill wizard` driven the way a person uses it: the real console script in a pseudo-terminal, both paths, with
wrong answers that are refused and asked again; then the written config re-runs with `lmdistill run`."""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pexpect
import yaml

LMDISTILL = shutil.which("lmdistill", path=str(Path(sys.executable).parent)) or "lmdistill"
# One torch thread per process (the box is shared); no colours and wide lines, so messages arrive unbroken.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TERM": "xterm", "NO_COLOR": "1", "COLUMNS": "220", "HF_HUB_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


class Session:
    """A wizard in a pty: `answer(key, text)` waits for the question with that key and types the answer."""

    def __init__(self, cwd: Path):
        self.log = io.StringIO()
        self.child = pexpect.spawn(LMDISTILL, ["wizard"], cwd=str(cwd), env=ENV, encoding="utf-8", timeout=120,
                                   dimensions=(60, 220))
        self.child.logfile_read = self.log

    def answer(self, key: str, text: str = "") -> None:
        try:
            self.child.expect_exact(f"[{key}]")
        except pexpect.ExceptionPexpect as err:
            raise AssertionError(f"no question [{key}]; output so far:\n{self.log.getvalue()[-4000:]}") from err
        self.child.sendline(text)

    def refused(self, why: str) -> None:
        """The last answer was refused with `why` in the message (the question then comes again)."""
        self.child.expect_exact("not accepted:")
        self.child.expect_exact(why)

    def finish(self, timeout: int = 240) -> str:
        self.child.expect(pexpect.EOF, timeout=timeout)
        self.child.close()
        out = self.log.getvalue()
        assert self.child.exitstatus == 0, out[-4000:]
        return out


def _advanced(session: Session) -> None:
    """Tiny-model settings, reached through the wizard's own 'advanced' question."""
    session.answer("advanced", "y")
    session.answer("max_length", "48")
    session.answer("max_new_tokens", "4")
    session.answer("speed", "n")


def _assert_run(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for role in ("student_before", "student_after"):
        assert 0.0 <= metrics[role]["rouge_l"] <= 1.0, metrics
    assert (run_dir / "report.html").exists() and (run_dir / "final" / "config.json").exists()
    return metrics


def test_distillation_path(tmp_path, teacher_dir, student_dir, qa_jsonl):
    s = Session(tmp_path)
    s.answer("approach", "2")
    s.answer("teacher", str(tmp_path / "no_such_teacher"))
    s.refused("does not exist")
    s.answer("teacher", str(teacher_dir))
    s.answer("student", str(student_dir))
    s.answer("dataset", str(qa_jsonl))
    s.answer("samples", "24")
    s.answer("eval_data")  # Enter: hold rows of the dataset out
    s.answer("eval_rows", "2")
    s.answer("temperature")  # Enter: 2.0
    s.answer("alpha", "1.5")
    s.refused("out of range")
    s.answer("alpha", "0.3")
    s.answer("epochs", "1")
    s.answer("batch_size", "4")
    s.answer("learning_rate", "1e-3")
    _advanced(s)
    s.answer("output_dir", "run")
    s.answer("config")  # Enter: run.yaml next to the run
    s.answer("start")  # Enter: yes
    out = s.finish()
    assert "student_after" in out and "ROUGE-L" in out

    config = yaml.safe_load((tmp_path / "run.yaml").read_text())
    stage = config["stages"][0]
    assert (stage["kind"], stage["temperature"], stage["alpha"], stage["epochs"]) == ("distill", 2.0, 0.3, 1.0)
    assert config["teacher"]["name"] == str(teacher_dir) and config["student"]["name"] == str(student_dir)
    assert (config["training"]["learning_rate"], config["training"]["batch_size"]) == (1e-3, 4)
    assert config["data"]["max_length"] == 48 and config["generation"]["max_new_tokens"] == 4
    train = (tmp_path / "run" / "data" / "train.jsonl").read_text().splitlines()
    held = (tmp_path / "run" / "data" / "eval.jsonl").read_text().splitlines()
    assert (len(train), len(held)) == (22, 2) and not set(train) & set(held)
    metrics = _assert_run(tmp_path / "run")
    assert "teacher" in metrics


def test_finetuning_path_and_rerun(tmp_path, student_dir, qa_jsonl):
    s = Session(tmp_path)
    s.answer("approach")  # Enter: fine-tuning, as in the seed
    s.answer("method", "7")
    s.refused("not one of the choices")
    s.answer("method", "1")
    s.answer("model", str(student_dir))
    s.answer("dataset", str(tmp_path / "missing.jsonl"))
    s.refused("data file not found")
    s.answer("dataset", str(qa_jsonl))
    s.answer("samples", "24")
    s.answer("eval_data")
    s.answer("eval_rows", "2")
    s.answer("epochs", "1")
    s.answer("batch_size", "four")
    s.refused("not a whole number")
    s.answer("batch_size", "4")
    s.answer("learning_rate", "1e-3")
    _advanced(s)
    s.answer("output_dir", "ft")
    s.answer("config", "ft.yaml")
    s.answer("start", "y")
    s.finish()

    config = yaml.safe_load((tmp_path / "ft.yaml").read_text())
    assert "teacher" not in config and config["student"]["lora"] == {"method": "lora"}
    assert config["stages"][0]["kind"] == "finetune"
    metrics = _assert_run(tmp_path / "ft")
    assert "teacher" not in metrics

    # The written config re-runs as it is with `lmdistill run` (into another folder).
    rerun = subprocess.run([LMDISTILL, "run", "ft.yaml", "--output_dir", "again"], cwd=tmp_path, env=ENV,
                           capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    _assert_run(tmp_path / "again")
