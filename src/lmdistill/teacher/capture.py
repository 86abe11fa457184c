"""One teacher pass over a batch: log-softmax over the full vocabulary, then the top k per counted token.

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


@torch.no_grad()
def capture_topk(model: torch.nn.Module, batch: dict[str, Tensor], task_type: str, k: int, temperature: float,
                 vocab_size: int) -> Captured:
    """Top-k of log softmax(logits[:V] / T) at every counted token (never the top k of raw logits: the
    normalisation runs over the whole vocabulary first, so the kept log-probs are the teacher's true ones)."""
    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in batch.items()}
    logits, target = aligned_logits(model, batch, task_type)
    counted = target != IGNORE_INDEX  # [B, T']
    rows = logits[counted][:, :vocab_size].float()  # [n, V]
    logprobs = torch.log_softmax(rows / temperature, dim=-1)  # [n, V]
    top, ids = logprobs.topk(k, dim=-1)  # [n, k] each, most likely first
    # Mass outside the top k from the full distribution (1 - sum(top) would lose it to rounding when it is tiny).
    tail = logprobs.scatter(-1, ids, float("-inf")).logsumexp(-1).exp() if k < vocab_size else top.new_zeros(len(top))
    return Captured(ids.cpu(), top.cpu(), tail.cpu(), counted.sum(1).cpu())
