"""Seq2seq fixtures: source/target rows over the shared corpus, and a pipeline config over the tiny T5 pair."""

import json

import pytest


@pytest.fixture(scope="module")
def t5_pair(t5_teacher_dir, t5_student_dir):
    from transformers import AutoModelForSeq2SeqLM

    teacher = AutoModelForSeq2SeqLM.from_pretrained(t5_teacher_dir).eval().requires_grad_(False)
    student = AutoModelForSeq2SeqLM.from_pretrained(t5_student_dir).eval()  # eval: no dropout in the comparisons
    return teacher, student


@pytest.fixture(scope="session")
def seq2seq_jsonl(tmp_path_factory, qa_jsonl):
    """The `qa_jsonl` pairs as source/target rows (the seq2seq format)."""
    rows = [json.loads(line) for line in qa_jsonl.read_text().splitlines()]
    path = tmp_path_factory.mktemp("s2s_data") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"source": r["prompt"], "target": r["completion"]}) + "\n" for r in rows))
    return path


@pytest.fixture
def t5_pipeline(tmp_path, t5_teacher_dir, t5_student_dir, seq2seq_jsonl, qa_jsonl):
    """A factory for a config dict over the tiny T5 teacher/student; stages given by the caller."""

    def make(stages, **top):
        data = {
            "teacher": {"name": str(t5_teacher_dir)},
            "student": {"name": str(t5_student_dir)},
            "data": {"max_length": 32, "sources": {"pairs": {"path": str(seq2seq_jsonl)},
                                                    "qa": {"path": str(qa_jsonl), "max_rows": 64}},
                     "eval": {"pairs": {"path": str(seq2seq_jsonl), "max_rows": 8}}},
            "training": {"batch_size": 8, "learning_rate": 3e-3, "logging_steps": 1, "report_to": [],
                         "lr_scheduler_type": "constant", "eval_batch_size": 8, "no_cuda": True},
            "evaluation": {"num_samples": 2, "report": False},
            "generation": {"max_new_tokens": 6},
            "output_dir": str(tmp_path / "run"),
            "stages": stages,
        }
        data.update(top)
        return data

    return make
