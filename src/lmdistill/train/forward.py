"""The forward passes of one distillation step: the student's and the frozen teacher's, and what the losses read.

`ForwardPasses` runs a model the way the step's losses need it: logits only at the scored positions (transformers'
`logits_to_keep`), or, for the fused loss, no logits at all but the hidden states entering the lm_head; hidden
states and attentions when the hidden-state terms read them. The teacher runs under no_grad on its own device, its
outputs come back to the student's, and a sharded teacher frees what its forward left gathered. Several teachers
(teacher/ensemble.py) route each example by its source id, and for the fused loss give each mixed teacher's head
input and head.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from lmdistill.errors import TrainingError
from lmdistill.models.sharding import is_sharded, release_gathered
from lmdistill.train.heads import forward_takes, head_inputs, head_rows, logit_scale, output_layer, softcap, unwrapped


class ForwardPasses:
    """teacher: the frozen teacher (None: none runs live); teacher_logits: the logit terms score its distribution
    (not a cache's); hidden / attentions: the hidden-state terms read those outputs; fused: the fused loss forms
    the logits itself from the head inputs; cross_vocab: terms against another vocabulary read the student's whole
    logits; shared_vocab: the rows of the heads the logits are cut to (None: all)."""

    def __init__(self, teacher: nn.Module | None, *, teacher_logits: bool, hidden: bool, attentions: bool,
                 task_type: str, fused: bool, cross_vocab: bool, shared_vocab: int | None) -> None:
        self.teacher = teacher
        self.teacher_logits = teacher_logits
        self.hidden = hidden
        self.attentions = attentions
        self.task_type = task_type
        self.fused = fused
        self.cross_vocab = cross_vocab
        self.shared_vocab = shared_vocab
        self._teacher_sharded = is_sharded(teacher)
        if self._teacher_sharded and getattr(teacher, "sources", None):
            raise TrainingError("teachers routed by source (sources:) run on other examples on each process, but a "
                                "sharded teacher's forward passes must run on every process together: set shard: never "
                                "on every entry of teachers:, or drop sources:")

    @property
    def runs_teacher(self) -> bool:
        """The step runs the live teacher: the logit terms or the hidden-state terms read it."""
        return self.teacher is not None and (self.teacher_logits or self.hidden or self.attentions)

    def scored(self, model: nn.Module, target: torch.Tensor, return_outputs: bool) -> torch.Tensor | None:
        """[B, T] bool: the positions whose logits a logit term scores (position t predicts label t+1), when the
        student forms logits at chosen positions (transformers' logits_to_keep): the lm_heads, the student's head
        gradient and the loss then skip prompt and padding positions. None: the whole [B, T, V] logits, which
        fused: true never forms, seq2seq and the cross-tokenizer terms read, and evaluation returns."""
        if (self.fused or return_outputs or self.cross_vocab or self.task_type != "causal"
                or not forward_takes(model, "logits_to_keep")):
            return None
        keep = target != -100
        return torch.cat([keep, keep.new_zeros(keep.shape[0], 1)], dim=1)  # the last position predicts nothing

    def student(self, model: nn.Module, inputs: dict, labels: torch.Tensor, scored: torch.Tensor | None):
        """The student's outputs: logits (at the scored positions, [n, V]), or for the fused loss `head_input`."""
        return self._outputs(model, inputs, labels, body_only=self.fused, scored=scored)

    def teacher_outputs(self, inputs: dict, labels: torch.Tensor, scored: torch.Tensor | None):
        """The teacher's forward pass, on the teacher's own device (teacher.device); outputs come back to the
        student's device, in the teacher's dtype (the losses upcast to float32). scored: as for the student."""
        # Several teachers (teacher/ensemble.py) route each example by its source id.
        teacher = self.teacher.for_batch(inputs) if hasattr(self.teacher, "for_batch") else self.teacher
        here = labels.device
        there = next(teacher.parameters()).device
        if there != here:
            inputs = {key: inputs[key].to(there) for key in ("input_ids", "attention_mask")}
            labels = labels.to(there)
            scored = scored.to(there) if scored is not None else None
        with torch.no_grad():
            # Logits only where the logit terms read them (not fused, no cache): hidden-state terms need none.
            out = self._outputs(teacher, inputs, labels, body_only=self.fused or not self.teacher_logits,
                                scored=scored)
        if self._teacher_sharded:
            release_gathered(self.teacher)
        if there == here:
            return out
        for key, value in out.items():
            if torch.is_tensor(value):
                out[key] = value.to(here)
            elif isinstance(value, tuple) and all(torch.is_tensor(v) for v in value):  # hidden states, attentions
                out[key] = tuple(v.to(here) for v in value)
        return out

    def fused_teacher(self, teacher_out, aligned: Callable[[torch.Tensor], torch.Tensor]) -> dict:
        """The fused loss's teacher arguments: the teacher's head input and head (rows cut to the shared vocabulary,
        as the logits are), or with several teachers a sequence of each, one per mixed teacher, and their weights.
        aligned: a per-position tensor cut to the positions that predict a label."""
        if not self.teacher_logits:
            return {"teacher_hidden": None, "teacher_weight": None, "teacher_bias": None}
        several = hasattr(self.teacher, "mixed")
        members, mixture = self.teacher.mixed() if several else ([self.teacher], None)
        hidden = teacher_out.head_input if several else [teacher_out.head_input]
        rows = [head_rows(output_layer(m), self.shared_vocab) for m in members]
        args = {"teacher_hidden": [aligned(h) for h in hidden], "teacher_weight": [w for w, _ in rows],
                "teacher_bias": [b for _, b in rows], "teacher_softcap": [softcap(m) for m in members],
                "teacher_logit_scale": [logit_scale(m) for m in members]}
        return {**args, "mixture": mixture} if several else {key: value[0] for key, value in args.items()}

    def _outputs(self, model: nn.Module, inputs: dict, labels: torch.Tensor, *, body_only: bool,
                 scored: torch.Tensor | None = None):
        """The model's outputs; body_only: no logits, but `head_input` [B, T, H], what enters the lm_head. scored
        [B, T] bool (see `scored`): logits [n, V] at those positions only."""
        kwargs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                      output_hidden_states=self.hidden, output_attentions=self.attentions)
        if forward_takes(model, "use_cache"):
            kwargs["use_cache"] = False  # nothing here decodes; the teacher's cache would live through the loss
        if scored is not None and not body_only and forward_takes(model, "logits_to_keep"):
            kwargs["logits_to_keep"] = scored
        if self.task_type == "seq2seq":
            kwargs["decoder_input_ids"] = unwrapped(model).prepare_decoder_input_ids_from_labels(labels=labels)
        if not body_only:
            out = model(**kwargs)
            if scored is not None and "logits_to_keep" not in kwargs:  # e.g. several teachers: cut here instead
                out["logits"] = out.logits[scored]
            return out
        if hasattr(model, "mixed"):  # several teachers (teacher/ensemble.py): each mixed teacher's head input
            out = CausalLMOutput()
            out["head_input"] = [self._outputs(member, inputs, labels, body_only=True).head_input
                                 for member in model.mixed()[0]]
            return out
        with head_inputs(model) as captured:
            out = model(**kwargs)
        out["head_input"] = captured[-1]
        return out
