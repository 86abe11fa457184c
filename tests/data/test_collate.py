"""Batches: right padding with pad id / -100, example ids, left-padded prompts for generation."""

from __future__ import annotations

import pytest
import torch

from lmdistill.config import GenerationSettings
from lmdistill.data.collate import DistillCollator
from lmdistill.errors import DataError
from lmdistill.teacher.generations import with_text_prompt

EXAMPLES = [
    {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9], "prompt_length": 2, "row_id": 0, "example_id": 10},
    {"input_ids": [11, 12, 13], "labels": [-100, 12, 13], "prompt_length": 1, "row_id": 1, "example_id": 11},
]


def test_causal_batch_is_right_padded():
    batch = DistillCollator(pad_token_id=0)(EXAMPLES)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [11, 12, 13, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8, 9], [-100, 12, 13, -100, -100]]
    assert batch["example_id"].tolist() == [10, 11]
    assert all(t.dtype == torch.long for t in batch.values())


def test_example_id_only_when_every_example_has_one():
    plain = [{k: v for k, v in e.items() if k != "example_id"} for e in EXAMPLES]
    assert "example_id" not in DistillCollator(0)(plain)


def test_prompts_are_left_padded_for_generation():
    ids, mask = DistillCollator(pad_token_id=0).collate_prompts(EXAMPLES)
    assert ids.tolist() == [[5, 6], [0, 11]]
    assert mask.tolist() == [[1, 1], [0, 1]]


def test_seq2seq_batch_and_prompts():
    examples = [{"input_ids": [4, 5, 1], "labels": [7, 1]}, {"input_ids": [6, 1], "labels": [8, 9, 1]}]
    collator = DistillCollator(pad_token_id=0, task_type="seq2seq")
    batch = collator(examples)
    assert batch["input_ids"].tolist() == [[4, 5, 1], [6, 1, 0]]
    assert batch["labels"].tolist() == [[7, 1, -100], [8, 9, 1]]
    ids, mask = collator.collate_prompts(examples)
    assert ids.tolist() == [[4, 5, 1], [6, 1, 0]] and mask.tolist() == [[1, 1, 1], [1, 1, 0]]


def test_examples_without_a_prompt_are_refused_saying_what_to_do():
    text = {"input_ids": [5, 6, 7, 1], "labels": [5, 6, 7, 1], "prompt_length": 0, "row_id": 3, "text_tokens": 3}
    empty = {"input_ids": [8, 1], "labels": [8, 1], "prompt_length": 0, "row_id": 4}
    with pytest.raises(DataError) as refused:
        DistillCollator(0).collate_prompts([text, EXAMPLES[0], empty])
    message = str(refused.value)
    assert message.startswith("nothing to generate from: plain-text examples with row_id [3] have no prompt yet: make "
                              "the first part of each text its prompt first with "
                              "lmdistill.teacher.generations.with_text_prompt")
    assert message.endswith("examples with row_id [4] have an empty prompt (their prompt gave no tokens and the "
                            "tokenizer puts no bos token or chat template before it): give those rows a prompt")
    assert "\n" not in message
    # What the message says to do works: the first half of the text becomes its prompt.
    ids, mask = DistillCollator(0).collate_prompts([with_text_prompt(text, GenerationSettings())])
    assert ids.tolist() == [[5, 6]] and mask.tolist() == [[1, 1]]


def test_eos_used_as_pad_keeps_its_label():
    """With pad == eos (a tokenizer without a pad token), the trained eos must not be masked as padding."""
    batch = DistillCollator(pad_token_id=1)([{"input_ids": [5, 1], "labels": [5, 1]}, {"input_ids": [7], "labels": [7]}])
    assert batch["labels"].tolist() == [[5, 1], [7, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 0]]
