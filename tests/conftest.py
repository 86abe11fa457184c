"""Shared fixtures: a tokenizer trained here and tiny models saved with save_pretrained, loaded back through
the same code path users take for hub names. No network anywhere."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and on a shared 2-core box extra threads made steps ~50x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Tokenised sources are cached per test session, not in the user's ~/.cache.
os.environ.setdefault("LMDISTILL_CACHE_DIR", tempfile.mkdtemp(prefix="lmdistill-tokenized-"))

VOCAB_SIZE = 1024

_SUBJECTS = ["the bank", "a trader", "the market", "our fund", "the company", "an analyst", "the teacher", "a student"]
_VERBS = ["reports", "expects", "buys", "sells", "explains", "measures", "predicts", "reviews"]
_OBJECTS = ["higher yields", "the quarterly results", "a small loss", "strong growth", "new bonds", "the interest rate",
            "cash flow", "the annual report", "risk", "dividends"]
_TAILS = ["today.", "this year.", "in March.", "after the meeting.", "for investors.", "again.", "slowly.", "with care."]


def make_sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
            for _ in range(n)]


def make_qa_pairs(n: int, seed: int = 1) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        subject, obj = rng.choice(_SUBJECTS), rng.choice(_OBJECTS)
        pairs.append((f"What does {subject} report?", f"{subject.capitalize()} reports {obj} {rng.choice(_TAILS)}"))
    return pairs


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return make_sentences(400)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus) -> Path:
    from lmdistill.models.tiny import train_tokenizer

    texts = corpus + [f"{q} {a}" for q, a in make_qa_pairs(200)]
    tok = train_tokenizer(texts, vocab_size=VOCAB_SIZE)
    path = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _save_model(model, tokenizer_dir: Path, path: Path) -> Path:
    from transformers import AutoTokenizer

    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer_dir, tokenizer) -> Path:
    """Llama-style teacher, 4 layers x 128."""
    from lmdistill.models.tiny import tiny_causal_lm

    model = tiny_causal_lm(len(tokenizer), num_layers=4, hidden_size=128, seed=1)
    return _save_model(model, tokenizer_dir, tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory, tokenizer_dir, tokenizer) -> Path:
    """Llama-style student, 2 layers x 64."""
    from lmdistill.models.tiny import tiny_causal_lm

    model = tiny_causal_lm(len(tokenizer), num_layers=2, hidden_size=64, seed=2)
    return _save_model(model, tokenizer_dir, tmp_path_factory.mktemp("student"))


@pytest.fixture(scope="session")
def t5_teacher_dir(tmp_path_factory, tokenizer_dir, tokenizer) -> Path:
    from lmdistill.models.tiny import tiny_seq2seq_lm

    model = tiny_seq2seq_lm(len(tokenizer), num_layers=2, d_model=128, seed=3)
    return _save_model(model, tokenizer_dir, tmp_path_factory.mktemp("t5_teacher"))


@pytest.fixture(scope="session")
def t5_student_dir(tmp_path_factory, tokenizer_dir, tokenizer) -> Path:
    from lmdistill.models.tiny import tiny_seq2seq_lm

    model = tiny_seq2seq_lm(len(tokenizer), num_layers=1, d_model=64, seed=4)
    return _save_model(model, tokenizer_dir, tmp_path_factory.mktemp("t5_student"))


@pytest.fixture(scope="session")
def text_jsonl(tmp_path_factory, corpus) -> Path:
    import json

    path = tmp_path_factory.mktemp("data") / "general.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus[:200]))
    return path


@pytest.fixture(scope="session")
def qa_jsonl(tmp_path_factory) -> Path:
    """Prompt/completion pairs (the 'domain' set in pipeline tests)."""
    import json

    path = tmp_path_factory.mktemp("data") / "domain.jsonl"
    path.write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n" for q, a in make_qa_pairs(200)))
    return path


@pytest.fixture(scope="session")
def base_tokenizer_dir(tmp_path_factory, corpus) -> Path:
    """A GPT-2-style tokenizer for base models: byte-level BPE, <|endoftext|> as both bos and eos, no pad token, no
    chat template."""
    from lmdistill.models.tiny import train_tokenizer

    tok = train_tokenizer(corpus, vocab_size=VOCAB_SIZE, chat_template=False)
    tok.bos_token, tok.pad_token = "<|endoftext|>", None
    path = tmp_path_factory.mktemp("base_tokenizer")
    tok.save_pretrained(path)
    return path
