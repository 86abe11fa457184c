"""Batching: pad tokenised examples (see tokenize.py) into tensors."""

from __future__ import annotations

import torch

from lmdistill.data.rounds import FILLER, filler_rows
from lmdistill.data.tokenize import IGNORE_INDEX, TASK_TYPES
from lmdistill.errors import DataError


def _pad(rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    """[B] ragged lists -> [B, T] LongTensor padded with `value` on the right (or on the left)."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, slice(width - len(r), width) if left else slice(0, len(r))] = torch.tensor(r, dtype=torch.long)
    return out


class DistillCollator:
    """Right-pads examples into a batch.

    Returns input_ids [B, T] (pad_token_id), attention_mask [B, T] (1 on real tokens), labels [B, T] for
    causal or [B, T_target] for seq2seq (-100 on padding), example_id [B] when every example has one
    (MixtureDataset items do), and filler [B] bool when some example only completes the processes' last round
    (rounds.py). Other keys (source, bucket, prompt_length) stay out of the batch.
    """

    def __init__(self, pad_token_id: int, task_type: str = "causal") -> None:
        if task_type not in TASK_TYPES:
            raise DataError(f"unknown task_type '{task_type}': use one of {', '.join(TASK_TYPES)}.")
        self.pad_token_id = pad_token_id
        self.task_type = task_type

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        ids = [e["input_ids"] for e in examples]
        batch = {
            "input_ids": _pad(ids, self.pad_token_id),
            "attention_mask": _pad([[1] * len(r) for r in ids], 0),
            "labels": _pad([e["labels"] for e in examples], IGNORE_INDEX),
        }
        if all("example_id" in e for e in examples):
            batch["example_id"] = torch.tensor([e["example_id"] for e in examples], dtype=torch.long)
        if (fillers := filler_rows(examples)) is not None:  # rows that count nothing (rounds.py)
            batch[FILLER] = fillers
        return batch

    def collate_prompts(self, examples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt parts for generation: (input_ids [B, P], attention_mask [B, P]).

        Causal prompts (the first prompt_length tokens) are left-padded so generated tokens follow them
        directly; seq2seq prompts are the encoder inputs, right-padded.
        """
        if self.task_type == "seq2seq":
            prompts = [e["input_ids"] for e in examples]
        else:
            prompts = [e["input_ids"][:e["prompt_length"]] for e in examples]
            empty = [e for e, p in zip(examples, prompts) if not p]
            if empty:
                raise DataError(_no_prompt(empty))
        left = self.task_type == "causal"
        return _pad(prompts, self.pad_token_id, left=left), _pad([[1] * len(p) for p in prompts], 0, left=left)


def _no_prompt(examples: list[dict]) -> str:
    """Why causal examples with an empty prompt (prompt_length 0) cannot be generated from, and what to do. The
    commands never pass one: `generate` and policy stages first take the first part of a plain text as its prompt, and
    `generate` leaves out rows whose prompt is empty. Code that calls this directly can."""
    texts = [e.get("row_id") for e in examples if "text_tokens" in e]
    others = [e.get("row_id") for e in examples if "text_tokens" not in e]
    reasons = []
    if texts:
        reasons.append(f"plain-text examples with row_id {texts} have no prompt yet: make the first part of each text "
                       "its prompt first with lmdistill.teacher.generations.with_text_prompt (as `lmdistill generate` "
                       "and policy stages do; generation.text_prompt_fraction / text_prompt_tokens say how much)")
    if others:
        reasons.append(f"examples with row_id {others} have an empty prompt (their prompt gave no tokens and the "
                       "tokenizer puts no bos token or chat template before it): give those rows a prompt")
    return "nothing to generate from: " + "; ".join(reasons)


class CrossTokenizerCollator(DistillCollator):
    """DistillCollator plus the teacher's own tokens of each example (a teacher with another tokenizer):
    teacher_input_ids / teacher_attention_mask [B, T'] and pairs [B, P, 2] of (student position, teacher position)
    (-1: padding)."""

    def __init__(self, pad_token_id: int, teacher_pad_token_id: int) -> None:
        super().__init__(pad_token_id, task_type="causal")
        self.teacher_pad_token_id = teacher_pad_token_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().__call__(examples)
        ids = [e["teacher_input_ids"] for e in examples]
        batch["teacher_input_ids"] = _pad(ids, self.teacher_pad_token_id)
        batch["teacher_attention_mask"] = _pad([[1] * len(r) for r in ids], 0)
        width = max(1, max(len(e["pairs"]) for e in examples))
        pairs = torch.full((len(examples), width, 2), -1, dtype=torch.long)
        for i, e in enumerate(examples):
            if e["pairs"]:
                pairs[i, : len(e["pairs"])] = torch.tensor(e["pairs"], dtype=torch.long)
        batch["pairs"] = pairs
        return batch
