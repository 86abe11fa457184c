"""bench/ordering.py --quick: every method trains through the pipeline on a teacher and data passed by path, from a
shared warm-start student, and the tables, JSON and chart are written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "ordering.py"


@pytest.fixture(scope="module")
def ordering():
    spec = importlib.util.spec_from_file_location("bench_ordering", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_trains_every_method_and_writes_the_tables(ordering, tmp_path, teacher_dir, student_dir, qa_jsonl):
    out = tmp_path / "out"
    results = ordering.main(["--teacher", str(teacher_dir), "--train", str(qa_jsonl), "--eval", str(qa_jsonl),
                             "--student", str(student_dir), "--warm-steps", "2", "--max-new-tokens", "6",
                             "--max-length", "48",
                             "--out", str(out), "--quick"])
    assert list(results["summary"]) == list(ordering.METHODS)
    for method, row in results["summary"].items():
        assert all(0.0 <= row[key] <= 1.0 for key in ordering.SCORES), (method, row)
        assert row["seconds"] > 0
    # Each method trained its own student through the pipeline, for its 4 steps.
    for method in ordering.METHODS:
        state = json.loads((out / "seed0" / method / method / "log_history.json").read_text())
        assert max(entry.get("step", 0) for entry in state) == 4, method
    # They all started from the warm-start student (2 CE steps on gold).
    assert max(e.get("step", 0) for e in json.loads((out / "warm" / "warm" / "log_history.json").read_text())) == 2
    assert json.loads((out / "results.json").read_text())["seeds"] == 1
    table = (out / "results.md").read_text()
    assert all(f"| {method} |" in table for method in ordering.METHODS) and "| teacher |" in table
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(("argv", "message"), [
    (["--teacher", "t"], "give --teacher, --train and --eval together"),
    (["--methods", "sft,ppo"], "--methods: unknown ['ppo']"),
])
def test_bad_arguments_say_what_to_do(ordering, argv, message, capsys):
    with pytest.raises(SystemExit):
        ordering.parse_args(argv)
    assert message in capsys.readouterr().err


def test_student_layers_build_the_student_from_the_teacher_in_every_method_config(ordering, tmp_path):
    from lmdistill.config import config_from_dict

    args = ordering.parse_args(["--teacher", "t", "--train", "a.jsonl", "--eval", "b.jsonl", "--student-layers", "2",
                               "--max-new-tokens", "16"])
    files = {"train": "a.jsonl", "valid": "v.jsonl", "teacher_answers": "s.jsonl"}
    for method in ordering.METHODS:
        config = config_from_dict(ordering.method_config(method, files, args, seed=1, out=tmp_path), method)
        assert config.student.from_teacher.num_layers == 2 and config.training.seed == 1
        assert config.stages[0].max_steps == args.steps
