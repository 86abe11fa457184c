"""The hidden-state terms (feature, attention, contrastive) of one micro-batch: which tokens count, and the scale that
makes them parts of the same mean as the logit terms.

They count the tokens the logit terms count: the response tokens of the label mask (a causal LM's position t carries
the prediction of label t + 1, so it counts when that label does); an encoder-decoder's encoder side covers the source
tokens of the rows with a counted label. Each module gives a mean over this micro-batch's counted tokens; weighted by
the micro-batch's share of the tokens counted in `num_items` (the whole accumulated batch, over every process), it
becomes a sum over counted tokens divided by num_items, exactly as a logit term, so N micro-batches accumulate to the
loss of one batch N times larger.

The contrastive term scores this process's examples against every process's (its negatives are gathered): it is one
value over all processes, with gradient through this process's rows only. `global_share` turns it into the per-process
share the trainer expects of every term.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AuxTerms:
    """Hidden-state terms beside the logit objective: name -> (module or function, weight)."""

    feature: nn.Module | None = None
    attention: object | None = None  # callable(student_attentions, teacher_attentions, attention_mask) -> loss
    contrastive: nn.Module | None = None
    weights: dict[str, float] = field(default_factory=dict)

    @property
    def needs_hidden(self) -> bool:
        return self.feature is not None or self.contrastive is not None

    @property
    def needs_attentions(self) -> bool:
        return self.attention is not None


def hidden_terms(aux: AuxTerms, task_type: str, student_out, teacher_out, inputs: dict, target: torch.Tensor,
                 num_items: torch.Tensor | None, spread: int, processes: int) -> dict[str, torch.Tensor]:
    """Each configured term's share of the global mean. target: the labels the logit terms score (after the causal
    shift), [B, T-1] (causal) or [B, T] (seq2seq); spread / processes as in the trainer's compute_loss."""
    if teacher_out is None or not (aux.needs_hidden or aux.needs_attentions):
        return {}
    counted = (target != -100).sum()
    scale = counted / num_items if num_items is not None else 1.0
    s, t = student_out, teacher_out
    if task_type == "seq2seq":
        # Every term covers both stacks (the EncoderDecoder* modules): encoder outputs over source tokens, decoder
        # outputs over counted labels (the decoder mask, not the encoder's); attention adds cross-attention.
        dec_mask = (target != -100).long()
        # a row with no counted label (a filler completing the last round, data/rounds.py) adds no source token either
        enc_mask = inputs["attention_mask"] * dec_mask.any(-1, keepdim=True)
        hidden = (s.encoder_hidden_states, t.encoder_hidden_states, enc_mask,
                  s.decoder_hidden_states, t.decoder_hidden_states, dec_mask)
        attentions = (s.encoder_attentions, t.encoder_attentions, enc_mask, s.decoder_attentions,
                      t.decoder_attentions, dec_mask, s.cross_attentions, t.cross_attentions)
    else:
        mask = F.pad((target != -100).long(), (0, 1))  # [B, T]: the last position predicts nothing
        hidden = (s.hidden_states, t.hidden_states, mask)
        attentions = (s.attentions, t.attentions, mask)
    terms = {}
    for name, args in (("feature", hidden), ("attention", attentions)):
        if (module := getattr(aux, name)) is not None:
            terms[name] = module(*args) * scale
    if aux.contrastive is not None:
        if spread == processes:  # num_items (or None: this micro-batch) counts every process's tokens, as the term does
            value = aux.contrastive(*hidden, num_items=num_items)
        else:  # num_items counts this process's tokens only: this process's share of them stands in for the whole
            value = aux.contrastive(*hidden) * scale
        terms["contrastive"] = global_share(value, spread, processes)
    return terms


def global_share(value: torch.Tensor, spread: int, processes: int) -> torch.Tensor:
    """A term equal on every process, with gradient through this process's rows only -> this process's share.

    The trainer's loss is `spread` x the sum of the shares, and DDP averages gradients over the processes: the
    shares' values must add up to the value once (value / spread each), and their gradients, each the part through
    one process's rows, to the whole gradient (x processes / spread each)."""
    fixed = value.detach()
    return fixed / spread + (value - fixed) * (processes / spread)
