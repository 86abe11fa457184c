"""Configs over the shared tiny models for teacher-output tests: few rows, short sequences, fast stages."""

from pathlib import Path

import pytest
from teacher_configs import config_dict


@pytest.fixture(scope="session")
def fixture_paths(teacher_dir, student_dir, text_jsonl, qa_jsonl) -> dict:
    return {"teacher": teacher_dir, "student": student_dir, "text": text_jsonl, "qa": qa_jsonl}


@pytest.fixture
def teacher_config(tmp_path, fixture_paths):
    """config_dict bound to the fixture models and a fresh output folder."""

    def make(stages=None, output_dir=None, **top):
        return config_dict(fixture_paths, output_dir or tmp_path / "run", stages, **top)

    return make


@pytest.fixture(scope="session")
def vocab_size(tokenizer) -> int:
    """The shared vocabulary the losses compare over (ids in use; the output layers may be larger)."""
    return max(tokenizer.get_vocab().values()) + 1


@pytest.fixture(scope="session")
def exact_cache(tmp_path_factory, fixture_paths, vocab_size) -> Path:
    """A k = V float32 cache of the default config's data, built once."""
    from lmdistill.config import config_from_dict
    from lmdistill.train.teacher_commands import cache_teacher

    folder = tmp_path_factory.mktemp("exact_cache")
    config = config_from_dict(config_dict(fixture_paths, folder / "run",
                                          teacher_cache={"k": vocab_size, "dtype": "float32", "path": str(folder / "c")}))
    return cache_teacher(config)[0]


@pytest.fixture(scope="session")
def topk_cache(tmp_path_factory, fixture_paths) -> Path:
    """A k = 64 float16 cache (the defaults) of the default config's data, captured at T = 2, built once."""
    from lmdistill.config import config_from_dict
    from lmdistill.train.teacher_commands import cache_teacher

    folder = tmp_path_factory.mktemp("topk_cache")
    config = config_from_dict(config_dict(fixture_paths, folder / "run",
                                          teacher_cache={"path": str(folder / "c"), "temperature": 2.0}))
    return cache_teacher(config)[0]
