"""Pipeline configs for the tiny fixture models: small steps, CPU, no external loggers."""

import pytest


@pytest.fixture
def tiny_pipeline(tmp_path, teacher_dir, student_dir, text_jsonl, qa_jsonl):
    """A factory for a config dict over the fixture models and data; stages given by the caller."""

    def make(stages, **top):
        data = {
            "teacher": {"name": str(teacher_dir)},
            "student": {"name": str(student_dir)},
            "data": {"max_length": 48, "sources": {"general": {"path": str(text_jsonl)},
                                                    "domain": {"path": str(qa_jsonl)}},
                     "eval": {"domain": {"path": str(qa_jsonl), "max_rows": 16}}},
            "training": {"batch_size": 4, "learning_rate": 3e-3, "logging_steps": 1, "report_to": [],
                         "lr_scheduler_type": "constant", "eval_batch_size": 8},
            "generation": {"max_new_tokens": 6},
            "evaluation": {"num_samples": 2, "max_prompts": 4, "measure_speed": False},
            "output_dir": str(tmp_path / "run"),
            "stages": stages,
        }
        data.update(top)
        return data

    return make
