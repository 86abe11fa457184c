"""Fixtures for the eval tests: the shared tiny models loaded once, and encoded examples shaped like the data
layer's (input_ids, unshifted labels with -100 on the prompt, prompt_length, source)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

QUESTIONS = ["What does the bank report?", "What does a trader expect?", "What does the market buy?",
             "What does our fund sell?", "What does the company explain?", "What does an analyst measure?"]
ANSWERS = ["Higher yields today.", "Strong growth this year.", "New bonds in March.", "A small loss again.",
           "The quarterly results.", "Cash flow with care."]


def encode_pair(tokenizer, prompt: str, answer: str, source: str = "domain") -> dict:
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = tokenizer(" " + answer)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": prompt_ids + answer_ids, "labels": [-100] * len(prompt_ids) + answer_ids,
            "prompt_length": len(prompt_ids), "source": source}


@pytest.fixture(scope="session")
def teacher(teacher_dir) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(teacher_dir)


@pytest.fixture(scope="session")
def student(student_dir) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(student_dir)


@pytest.fixture(scope="session")
def qa_pairs() -> list[tuple[str, str]]:
    return list(zip(QUESTIONS, ANSWERS))


@pytest.fixture(scope="session")
def qa_examples(tokenizer) -> list[dict]:
    """Prompt/answer examples of different lengths, prompt tokens masked."""
    return [encode_pair(tokenizer, q, a) for q, a in zip(QUESTIONS, ANSWERS)]


@pytest.fixture(scope="session")
def text_examples(tokenizer) -> list[dict]:
    """Plain text examples: every token after the first is counted."""
    rng = random.Random(0)
    texts = [" ".join(rng.choice(ANSWERS) for _ in range(rng.randint(1, 3))) for _ in range(5)]
    out = []
    for text in texts:
        ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        out.append({"input_ids": ids, "labels": list(ids), "prompt_length": 0, "source": "general"})
    return out
