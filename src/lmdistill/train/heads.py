"""A model's output layer as the fused loss needs it: found through DDP / accelerate / peft wrappers, its input
captured during the model's own forward, its rows cut to a shared vocabulary, the soft-cap and scale the
architecture applies after it, and what keeps the fused loss from reproducing it."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import torch
from torch import nn
from transformers.integrations import is_deepspeed_zero3_enabled

from lmdistill.errors import TrainingError
from lmdistill.models.sharding import is_sharded


def unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP / accelerate wrappers and peft."""
    while isinstance(getattr(model, "module", None), nn.Module):  # DistributedDataParallel and kin
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def output_layer(model: nn.Module) -> nn.Module:
    return unwrapped(model).get_output_embeddings()


@contextmanager
def head_inputs(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """While active, the model's lm_head records its input (the hidden states exactly as they reach it, after any
    scaling the architecture applies, e.g. T5's d_model^-0.5) and returns empty logits [..., 0]. The forward pass
    still goes through the model's wrappers (DDP registers its gradient sync there); the fused loss applies the head
    itself, a chunk of tokens at a time, so the [B, T, V] logits never exist."""
    head = output_layer(model)
    captured: list[torch.Tensor] = []
    had_own = "forward" in vars(head)  # e.g. accelerate's device hook on a dispatched model
    previous = vars(head).get("forward")

    def record(hidden: torch.Tensor) -> torch.Tensor:
        captured.append(hidden)
        return hidden.new_empty(*hidden.shape[:-1], 0)

    head.forward = record  # an instance attribute shadows the class's forward
    try:
        yield captured
    finally:
        if had_own:
            head.forward = previous
        else:
            del head.forward
    if not captured:
        raise TrainingError(f"fused: true: {type(unwrapped(model)).__name__} never called its output layer "
                            "(get_output_embeddings()); set fused: false")


def has_adapter(layer: nn.Module) -> bool:
    """A peft tuner layer (LoRA and kin) wraps this layer: its output is more than weight and bias."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return isinstance(layer, BaseTunerLayer)


def head_rows(head: nn.Module, vocab: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An output layer's weight [V, H] and bias [V], their rows cut to the first `vocab` (None: all)."""
    bias = head.bias if getattr(head, "bias", None) is not None else None
    if vocab is None:
        return head.weight, bias
    return head.weight[:vocab], bias[:vocab] if bias is not None else None


def same_device(a: torch.device, b: torch.device) -> bool:
    """cpu and cpu:0 (what Trainer reports under a launcher) are one device; cuda:0 and cuda:1 are not."""
    return a.type == b.type and (a.type == "cpu" or a.index == b.index)


def softcap(model: nn.Module) -> float | None:
    return getattr(unwrapped(model).config, "final_logit_softcapping", None)


def logit_scale(model: nn.Module) -> float:
    """A scale the model applies to its logits after the head (Cohere's `logit_scale`)."""
    return float(getattr(unwrapped(model).config, "logit_scale", None) or 1.0)


def forward_takes(model: nn.Module, name: str) -> bool:
    """The model's forward names `name` as a parameter (e.g. transformers' `logits_to_keep`, `use_cache`); a wrapper
    that passes **kwargs on (several teachers) names none."""
    return name in _forward_parameters(type(unwrapped(model)))


@lru_cache(maxsize=None)
def _forward_parameters(cls: type) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):  # a forward without a signature: pass nothing it may not take
        return frozenset()


def fused_blocker(student: nn.Module, teacher: nn.Module | None, device: torch.device, fsdp: bool) -> str | None:
    """Why fused: true cannot run with these models (the fused loss applies the output layers itself, from their
    weights, so it refuses heads it cannot reproduce), as a message saying what to do; None when it can."""
    teachers = list(teacher.mixed()[0]) if hasattr(teacher, "mixed") else [teacher]
    for who, model in (("student", student), *(("teacher", t) for t in teachers)):
        if model is not None and hasattr(unwrapped(model), "final_logits_bias"):
            return (f"fused: true cannot apply the {who}'s final_logits_bias (BART-style heads add it after the "
                    "lm_head); set fused: false")
    if has_adapter(output_layer(student)):
        return ("fused: true applies the student's lm_head weight itself, so a LoRA adapter on lm_head would be left "
                "out of the loss: remove lm_head from student.lora.target_modules, or set fused: false")
    if is_sharded(teacher) or fsdp or is_deepspeed_zero3_enabled():
        return ("fused: true reads the teacher's and the student's lm_head weights directly, but FSDP / DeepSpeed "
                "ZeRO-3 shard them over the processes: set fused: false")
    if teacher is not None and not same_device(next(teacher.parameters()).device, device):
        return ("fused: true needs the teacher on the student's device (its lm_head enters the loss); set "
                "teacher.device to the student's, or fused: false")
    return None
