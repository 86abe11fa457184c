"""One teacher pass over a batch: log-softmax over the full vocabulary, then the top k per counted token (or, for a
teacher with another tokenizer, per aligned pair).

Counted tokens are those the trainer scores: after the causal shift (logits at t score labels[t + 1]) with a label
other than -100; for seq2seq, the decoder positions with a label. The batch is padded and fed exactly as the trainer
feeds it (DistillCollator, attention mask, decoder inputs from labels), so cached rows line up with live ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmdistill.data.tokenize import IGNORE_INDEX


@dataclass
class Captured:
    """Per counted token of a batch, in row-major order: ids / logprobs [n, k], tail [n]; counts [B] per example."""

    ids: Tensor
    logprobs: Tensor
    tail: Tensor
    counts: Tensor


def aligned_logits(model: torch.nn.Module, batch: dict[str, Tensor], task_type: str) -> tuple[Tensor, Tensor]:
    """(logits [B, T', V], target [B, T']) where logits[b, t] scores target[b, t]."""
    labels = batch["labels"]
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    if task_type == "seq2seq":
        kwargs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=labels)
        return model(**kwargs).logits, labels
    return model(**kwargs).logits[:, :-1], labels[:, 1:]


def _topk(rows: Tensor, k: int, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k of log softmax(rows / T) [n, V] (never the top k of raw logits: the normalisation runs over the whole
    vocabulary first, so the kept log-probs are the teacher's true ones) and the mass outside it: ids, log-probs
    [n, k] (most likely first), tail [n]."""
    logprobs = torch.log_softmax(rows.float() / temperature, dim=-1)  # [n, V]
    top, ids = logprobs.topk(k, dim=-1)  # [n, k] each, most likely first
    # Mass outside the top k from the full distribution (1 - sum(top) would lose it to rounding when it is tiny).
    tail = logprobs.scatter(-1, ids, float("-inf")).logsumexp(-1).exp() if k < rows.shape[-1] \
        else top.new_zeros(len(top))
    return ids.cpu(), top.cpu(), tail.cpu()


@torch.no_grad()
def capture_topk(model: torch.nn.Module, batch: dict[str, Tensor], task_type: str, k: int, temperature: float,
                 vocab_size: int) -> Captured:
    """Top-k of log softmax(logits[:V] / T) at every counted token."""
    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in batch.items()}
    logits, target = aligned_logits(model, batch, task_type)
    counted = target != IGNORE_INDEX  # [B, T']
    return Captured(*_topk(logits[counted][:, :vocab_size], k, temperature), counted.sum(1).cpu())


@torch.no_grad()
def capture_paired_topk(model: torch.nn.Module, batch: dict[str, Tensor], k: int, temperature: float,
                        vocab_size: int) -> Captured:
    """A teacher with another tokenizer: top-k of log softmax(logits[:V] / T) at the teacher position of every pair
    (batch["pairs"] [B, P, 2], -1: padding), the teacher reading its own tokens (teacher_input_ids /
    teacher_attention_mask, as lmdistill.data.collate.CrossTokenizerCollator pads them). Rows in the order of the
    pairs; counts [B] pairs per example."""
    device = next(model.parameters()).device
    logits = model(input_ids=batch["teacher_input_ids"].to(device),
                   attention_mask=batch["teacher_attention_mask"].to(device)).logits  # [B, T', V]
    pairs = batch["pairs"].to(device)
    paired = pairs[..., 0] >= 0  # [B, P]
    rows, cols = paired.nonzero(as_tuple=True)
    return Captured(*_topk(logits[rows, pairs[rows, cols, 1]][:, :vocab_size], k, temperature), paired.sum(1).cpu())
