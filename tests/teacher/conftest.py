"""Configs over the shared tiny models for teacher-output tests: few rows, short sequences, fast stages."""

from pathlib import Path

import pytest

ROWS = 24


def config_dict(paths: dict, output_dir: Path, stages=None, **top) -> dict:
    """A pipeline config dict over the fixture models and data; top-level sections are merged one level deep."""
    data = {
        "teacher": {"name": str(paths["teacher"])},
        "student": {"name": str(paths["student"])},
        "data": {"max_length": 32, "sources": {"general": {"path": str(paths["text"]), "max_rows": ROWS},
                                               "domain": {"path": str(paths["qa"]), "max_rows": ROWS}},
                 "eval": {"domain": {"path": str(paths["qa"]), "max_rows": 8}}},
        "training": {"batch_size": 4, "learning_rate": 3e-3, "logging_steps": 1, "report_to": [],
                     "lr_scheduler_type": "constant", "eval_batch_size": 8},
        "teacher_cache": {"shard_examples": 10, "batch_size": 8},
        "evaluation": {"enabled": False},
        "output_dir": str(output_dir),
        "stages": stages or [{"name": "s", "max_steps": 2}],
    }
    for key, value in top.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
    return data


@pytest.fixture(scope="session")
def fixture_paths(teacher_dir, student_dir, text_jsonl, qa_jsonl) -> dict:
    return {"teacher": teacher_dir, "student": student_dir, "text": text_jsonl, "qa": qa_jsonl}


@pytest.fixture
def teacher_config(tmp_path, fixture_paths):
    """config_dict bound to the fixture models and a fresh output folder."""

    def make(stages=None, **top):
        return config_dict(fixture_paths, tmp_path / "run", stages, **top)

    return make


@pytest.fixture(scope="session")
def vocab_size(tokenizer) -> int:
    """The shared vocabulary the losses compare over (ids in use; the output layers may be larger)."""
    return max(tokenizer.get_vocab().values()) + 1


@pytest.fixture(scope="session")
def exact_cache(tmp_path_factory, fixture_paths, vocab_size) -> Path:
    """A k = V float32 cache of the default config's data, built once."""
    from lmdistill.config import config_from_dict
    from lmdistill.teacher.commands import cache_teacher

    folder = tmp_path_factory.mktemp("exact_cache")
    config = config_from_dict(config_dict(fixture_paths, folder / "run",
                                          teacher_cache={"k": vocab_size, "dtype": "float32", "path": str(folder / "c")}))
    return cache_teacher(config)[0]


@pytest.fixture(scope="session")
def topk_cache(tmp_path_factory, fixture_paths) -> Path:
    """A k = 64 float16 cache (the defaults) of the default config's data, built once."""
    from lmdistill.config import config_from_dict
    from lmdistill.teacher.commands import cache_teacher

    folder = tmp_path_factory.mktemp("topk_cache")
    config = config_from_dict(config_dict(fixture_paths, folder / "run", teacher_cache={"path": str(folder / "c")}))
    return cache_teacher(config)[0]
