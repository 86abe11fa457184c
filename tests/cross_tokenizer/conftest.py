"""Two structurally different tokenizers over the same corpus, as real families differ: the shared byte-level BPE
(no BOS, ChatML template, 1024 ids asked) and a SentencePiece-style one (metaspace, byte fallback, BOS, a
Zephyr-style template, 768 ids asked); tiny models over each."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def metaspace_tokenizer_dir(tmp_path_factory, corpus, qa_jsonl) -> Path:
    import json

    from lmdistill.models.tiny import train_metaspace_tokenizer

    rows = [json.loads(line) for line in qa_jsonl.read_text().splitlines()]
    texts = corpus + [f"{row['prompt']} {row['completion']}" for row in rows]
    path = tmp_path_factory.mktemp("metaspace_tokenizer")
    train_metaspace_tokenizer(texts, vocab_size=768).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def metaspace_tokenizer(metaspace_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(metaspace_tokenizer_dir)


@pytest.fixture(scope="session")
def metaspace_teacher_dir(tmp_path_factory, metaspace_tokenizer_dir, metaspace_tokenizer) -> Path:
    """A teacher (4 layers x 128) that speaks the metaspace tokenizer; its output layer scaled up so that its
    distributions are peaked, far from a fresh student's near-uniform ones (a distillation signal to follow)."""
    import torch
    from transformers import AutoTokenizer

    from lmdistill.models.tiny import tiny_causal_lm

    path = tmp_path_factory.mktemp("metaspace_teacher")
    model = tiny_causal_lm(len(metaspace_tokenizer), num_layers=4, hidden_size=128, seed=5)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(metaspace_tokenizer_dir).save_pretrained(path)
    return path


def cross_config_dict(teacher_dir, student_dir, qa_jsonl, folder: Path, stages, **top) -> dict:
    """A config dict: the metaspace teacher, the byte-level student, 8 question/answer rows, fast stages."""
    data = {
        "teacher": {"name": str(teacher_dir)},
        "student": {"name": str(student_dir)},
        "data": {"max_length": 48, "sources": {"domain": {"path": str(qa_jsonl), "max_rows": 8}},
                 "eval": {"domain": {"path": str(qa_jsonl), "max_rows": 2}}},
        "training": {"batch_size": 4, "learning_rate": 3e-3, "logging_steps": 1, "report_to": [],
                     "lr_scheduler_type": "constant", "eval_batch_size": 4},
        "generation": {"max_new_tokens": 8, "batch_size": 8, "path": str(folder / "generations.jsonl")},
        "evaluation": {"enabled": False, "num_samples": 0},
        "output_dir": str(folder / "run"),
        "stages": stages,
    }
    for key, value in top.items():
        data[key] = {**data[key], **value} if isinstance(data.get(key), dict) else value
    return data


@pytest.fixture
def cross_config(tmp_path, metaspace_teacher_dir, student_dir, qa_jsonl):
    """cross_config_dict in this test's tmp_path: make(stages, **top)."""

    def make(stages, **top):
        return cross_config_dict(metaspace_teacher_dir, student_dir, qa_jsonl, tmp_path, stages, **top)

    return make


@pytest.fixture(scope="session")
def cross_cache(tmp_path_factory, metaspace_teacher_dir, metaspace_tokenizer, student_dir, qa_jsonl) -> Path:
    """A teacher cache across tokenizers of cross_config's data, built once: k = the teacher's whole vocabulary,
    float32 (it describes the teacher exactly)."""
    from lmdistill.config import config_from_dict
    from lmdistill.train.teacher_commands import cache_teacher

    folder = tmp_path_factory.mktemp("cross_cache")
    stages = [{"name": "s", "max_steps": 1, "teacher_source": "cache", "losses": [{"name": "uld"}]}]
    config = cross_config_dict(metaspace_teacher_dir, student_dir, qa_jsonl, folder, stages,
                               teacher_cache={"k": len(metaspace_tokenizer), "dtype": "float32",
                                              "path": str(folder / "cache")})
    return cache_teacher(config_from_dict(config))[0]
