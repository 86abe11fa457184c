"""Pipeline config dicts over the fixture models for teacher-output tests: few rows, short sequences."""

from pathlib import Path

ROWS = 16


def config_dict(paths: dict, output_dir: Path, stages=None, **top) -> dict:
    """A pipeline config dict over the fixture models and data; top-level sections are merged one level deep."""
    data = {
        "teacher": {"name": str(paths["teacher"])},
        "student": {"name": str(paths["student"])},
        "data": {"max_length": 32, "sources": {"general": {"path": str(paths["text"]), "max_rows": ROWS},
                                               "domain": {"path": str(paths["qa"]), "max_rows": ROWS}},
                 "eval": {"domain": {"path": str(paths["qa"]), "max_rows": 4}}},
        "training": {"batch_size": 4, "learning_rate": 3e-3, "logging_steps": 1, "report_to": [],
                     "lr_scheduler_type": "constant", "eval_batch_size": 8},
        "teacher_cache": {"shard_examples": 10, "batch_size": 8},
        "evaluation": {"enabled": False, "num_samples": 0},
        "output_dir": str(output_dir),
        "stages": stages or [{"name": "s", "max_steps": 2}],
    }
    for key, value in top.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
    return data
