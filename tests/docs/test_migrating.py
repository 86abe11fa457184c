"""Every `lmdistill` command shown in docs/migrating.md runs on the tiny fixture models, in the order the page shows
them (so `init` writes the configs later lines use). Hub names are swapped for the fixture folders, in the commands
and in the configs `init` writes. Training runs become `--stage test` (models, tokenizers and data load and fit
together). `--fp16` is checked to stop with its one-line error where there is no CUDA, then runs as `--bf16`."""

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lmdistill.cli import app
from lmdistill.errors import ConfigError

DOC = Path(__file__).resolve().parents[2] / "docs" / "migrating.md"
TEACHERS = ["Qwen/Qwen-72B", "Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen3-32B", "gpt2-medium", "facebook/opt-6.7b",
            "meta-llama/Llama-2-7b-chat-hf", "EleutherAI/gpt-j-6b"]
STUDENTS = ["Qwen/Qwen-7B-instruct", "Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen3-1.7B", "gpt2", "facebook/opt-1.3b",
            "facebook/opt-125m", "meta-llama/Llama-2-2b-chat-hf", "EleutherAI/gpt-neo-1.3b"]
T5_TEACHERS, T5_STUDENTS = ["google/flan-t5-xl", "t5-large"], ["google/flan-t5-base", "t5-small"]
PAIR_DATA = ["tatsu-lab/alpaca", "databricks/databricks-dolly-15k", "HuggingFaceH4/ultrachat_200k", "cnn_dailymail"]
TEXT_DATA = ["wikitext", "openwebtext"]
_HUBLIKE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def doc_commands(text: str) -> list[str]:
    """The `lmdistill ...` lines of the page's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("lmdistill "):
                commands.append(line)
    return commands


@pytest.fixture
def names(teacher_dir, student_dir, t5_teacher_dir, t5_student_dir, qa_jsonl, text_jsonl) -> dict[str, str]:
    groups = [(TEACHERS, teacher_dir), (STUDENTS, student_dir), (T5_TEACHERS, t5_teacher_dir),
              (T5_STUDENTS, t5_student_dir), (PAIR_DATA, qa_jsonl), (TEXT_DATA, text_jsonl)]
    return {name: str(path) for group, path in groups for name in group}


def _swap(text: str, names: dict[str, str]) -> str:
    for name, path in names.items():
        text = re.sub(rf"(?<![\w./-]){re.escape(name)}(?![\w./-])", path, text)
    return text


def _local_data(cwd: Path, qa_jsonl: Path) -> None:
    """The local paths the page and the presets name, filled with the fixture's prompt/completion rows."""
    rows = qa_jsonl.read_text()
    for folder in ("finance_data", "medical_data"):
        (cwd / folder).mkdir()
        (cwd / folder / "train.jsonl").write_text(rows)
    (cwd / "finance_eval.jsonl").write_text(rows)
    (cwd / "dataset").mkdir()  # seed 003's layout: one JSON list of records
    (cwd / "dataset" / "train.json").write_text(json.dumps([json.loads(r) for r in rows.splitlines()]))


def _as_checked(args: list[str]) -> list[str]:
    """A training run as `--stage test`; a scripted wizard stops after writing its config."""
    if args[0] == "run" and "--create_config" not in args:
        if "--stage" in args:
            args[args.index("--stage") + 1] = "test"
        else:
            args += ["--stage", "test"]
    if args[0] == "wizard":
        args += ["--set", "start=n"]
    return args


def test_page_shows_commands_for_every_seed():
    commands = doc_commands(DOC.read_text())
    assert len(commands) >= 20
    for needle in ("--finance_dataset", "--medical_dataset", "wizard --yes", "--create_config", "--stage policy",
                   "--task_type seq2seq", "--vocab_chunk_size", "--pretrained_student", "--checkpoint_path"):
        assert any(needle in c for c in commands), needle


def test_every_command_on_the_page_runs(tmp_path, monkeypatch, names, qa_jsonl):
    monkeypatch.chdir(tmp_path)
    _local_data(tmp_path, qa_jsonl)
    runner, ran = CliRunner(), 0
    for command in doc_commands(DOC.read_text()):
        args = shlex.split(_swap(command, names))[1:]
        unmapped = [a for a in args if _HUBLIKE.match(a.split("=", 1)[-1]) and not Path(a.split("=", 1)[-1]).exists()]
        assert not unmapped, f"{command}: add {unmapped} to the name lists of this test"
        if args == ["wizard"]:
            continue  # the interactive wizard is driven in a pseudo-terminal by tests/wizard/test_wizard_pty.py
        args = _as_checked(args)
        if "--fp16" in args and not torch.cuda.is_available():
            result = runner.invoke(app, args)
            assert isinstance(result.exception, ConfigError) and "--fp16 needs a CUDA GPU" in str(result.exception)
            args[args.index("--fp16")] = "--bf16"
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and result.exception is None, (
            f"{command}\n-> lmdistill {shlex.join(args)}\n{result.output[-2000:]}\n{result.exception!r}")
        if "--stage" in args:
            assert "models, tokenizers and data load and fit together" in result.output, result.output[-2000:]
        for written in [Path(a) for a in args if a.endswith(".yaml") and Path(a).exists()]:
            written.write_text(_swap(written.read_text(), names))  # configs from init / --create_config / wizard
        ran += 1
    assert ran >= 20
    assert (tmp_path / "distilled_model.yaml").exists() and (tmp_path / "finetuned_model.yaml").exists()
