"""Several teachers as one: the module a stage runs in place of a single teacher when `teachers:` lists more.

`TeacherEnsemble(teachers, weights, sources, temperature)` is called like a model (input_ids, attention_mask) and
returns logits that every divergence reads as the stage's target: the weighted mixture of the teachers'
distributions at the stage temperature (`losses.mixture`), or, for an example whose source is routed, that one
teacher's distribution. `for_batch(inputs)` binds the batch's example ids (which name each example's source), so
each teacher runs only on the rows it scores; `for_source(name)` binds a whole batch to one source (what
`cache-teacher` captures, a source at a time).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from lmdistill.data.mixture import split_example_id
from lmdistill.errors import TrainingError
from lmdistill.losses.mixture import mixture_logits


class TeacherEnsemble(nn.Module):
    """teachers: frozen models; weights: their mixture weights; sources: training source name -> the index of the
    teacher that scores its examples alone. Examples of unrouted sources, and examples without an id (named eval
    sets), get the mixture of the unrouted teachers, or of all teachers when every one is routed."""

    def __init__(self, teachers: Sequence[nn.Module], weights: Sequence[float], sources: Mapping[str, int],
                 temperature: float) -> None:
        super().__init__()
        self.teachers = nn.ModuleList(teachers)
        self.weights = list(weights)
        self.sources = dict(sources)
        self.routes: dict[int, int] = {}  # source index in the stage's dataset -> teacher index
        routed = set(self.sources.values())
        self.default = [i for i in range(len(teachers)) if i not in routed] or list(range(len(teachers)))
        self.temperature = temperature
        # Teachers of one vocabulary may pad their heads differently: the rows they all have.
        self.vocab = min(t.get_output_embeddings().weight.shape[0] for t in teachers)
        self._example_ids: torch.Tensor | None = None
        self._source: str | None = None

    def use_source_order(self, names: Sequence[str]) -> None:
        """The stage's dataset numbers its sources in this order (example_id = index * ID_STRIDE + row)."""
        self.routes = {i: self.sources[name] for i, name in enumerate(names) if name in self.sources}

    def for_batch(self, inputs: Mapping[str, torch.Tensor]) -> TeacherEnsemble:
        """This ensemble with the batch's example ids bound for routing (the trainer calls it before forward)."""
        self._example_ids, self._source = inputs.get("example_id"), None
        return self

    def for_source(self, name: str) -> TeacherEnsemble:
        """This ensemble with every row of the next batches from source `name` (routed or mixed as in training)."""
        self._example_ids, self._source = None, name
        return self

    def assignment(self, batch_size: int) -> list[int | None]:
        """Per example: the routed teacher's index, or None for the mixture."""
        if self._source is not None:
            return [self.sources.get(self._source)] * batch_size
        if self._example_ids is None or not self.routes:
            return [None] * batch_size
        return [self.routes.get(split_example_id(int(i))[0]) for i in self._example_ids.tolist()]

    def mixed(self) -> tuple[list[nn.Module], list[float]]:
        """The teachers of the mixture and their weights: what the fused loss mixes per chunk from their heads."""
        return [self.teachers[i] for i in self.default], [self.weights[i] for i in self.default]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> CausalLMOutput:
        if kwargs.get("output_hidden_states") or kwargs.get("output_attentions"):
            raise TrainingError("several teachers give one mixed distribution, not hidden states or attentions; keep "
                                "logit losses only in a stage with several teachers")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("output_hidden_states", "output_attentions")}
        owner = self.assignment(input_ids.shape[0])
        groups: dict[int | None, list[int]] = {}
        for row, teacher in enumerate(owner):
            groups.setdefault(teacher, []).append(row)
        out: torch.Tensor | None = None
        for teacher, rows in groups.items():
            index = torch.tensor(rows, device=input_ids.device)
            part = {"input_ids": input_ids.index_select(0, index),
                    "attention_mask": attention_mask.index_select(0, index) if attention_mask is not None else None,
                    **{k: v.index_select(0, index) if torch.is_tensor(v) else v for k, v in kwargs.items()}}
            logits = self._target(self.default if teacher is None else [teacher], part)
            if out is None:
                out = logits.new_empty((input_ids.shape[0], *logits.shape[1:]))
            out[index] = logits
        return CausalLMOutput(logits=out)

    def _target(self, chosen: Sequence[int], inputs: dict) -> torch.Tensor:
        logits = [self.teachers[i](**inputs).logits[..., : self.vocab] for i in chosen]
        if len(chosen) == 1:
            return logits[0]  # one teacher's own logits: exactly what a single-teacher stage reads
        return mixture_logits(logits, [self.weights[i] for i in chosen], self.temperature)
