"""Strong-to-weak (seed 003) fixtures: one torch thread, the strong-to-weak preset over the tiny fixture models."""

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def s2w_config(tmp_path, teacher_dir, student_dir, qa_jsonl):
    """A factory: the strong-to-weak preset over the tiny models, few steps, CPU; `stages`/keys override."""
    from lmdistill.cli import _preset_dict

    def make(**top):
        data = _preset_dict("strong-to-weak")
        data.update({
            "teacher": {"name": str(teacher_dir), "dtype": "float32"},
            "student": {"name": str(student_dir), "dtype": "float32"},
            "data": {"max_length": 48, "sources": {"prompts": {"path": str(qa_jsonl), "max_rows": 16}},
                     "eval": {"prompts": {"path": str(qa_jsonl), "max_rows": 8}}},
            "training": {"batch_size": 4, "learning_rate": 3e-3, "logging_steps": 1, "report_to": [],
                         "lr_scheduler_type": "constant", "eval_batch_size": 8, "seed": 0},
            "generation": {**data["generation"], "max_new_tokens": 8, "batch_size": 8},
            "evaluation": {"enabled": False, "report": False},
            "output_dir": str(tmp_path / "run"),
        })
        for stage in data["stages"]:
            stage.pop("epochs", None)
            stage.pop("learning_rate", None)
            stage["max_steps"] = 2
        data.update(top)
        return data

    return make
