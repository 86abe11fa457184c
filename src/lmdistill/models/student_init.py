"""Build a student from the teacher by dropping layers (seed 000's "reduce layers"), as a real smaller model."""

from __future__ import annotations

import copy

import torch
from transformers import PreTrainedModel

from lmdistill.config import FromTeacher
from lmdistill.errors import ModelError


def evenly_spaced_layers(total: int, keep: int) -> list[int]:
    """`keep` layer indices spread over `total`, always keeping the first and the last."""
    if keep >= total:
        return list(range(total))
    if keep == 1:
        return [total - 1]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def _decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    base = getattr(model, model.base_model_prefix, None)
    layers = getattr(base, "layers", None) if base is not None else None
    if not isinstance(layers, torch.nn.ModuleList):
        raise ModelError(
            f"student.from_teacher supports decoder models whose layers live at model.{model.base_model_prefix}.layers "
            f"(Llama, Qwen, Mistral, Gemma, ...); {type(model).__name__} is not one of them")
    return layers


def student_from_teacher(teacher: PreTrainedModel, spec: FromTeacher) -> PreTrainedModel:
    total = teacher.config.num_hidden_layers
    keep = spec.keep_layers if spec.keep_layers is not None else evenly_spaced_layers(total, spec.num_layers)
    bad = [i for i in keep if not 0 <= i < total]
    if bad or len(set(keep)) != len(keep) or not keep:
        raise ModelError(f"student.from_teacher.keep_layers {keep} must be distinct indices in [0, {total - 1}]")
    student = copy.deepcopy(teacher)
    layers = _decoder_layers(student)
    kept = torch.nn.ModuleList(layers[i] for i in sorted(keep))
    for new_index, layer in enumerate(kept):
        # Attention modules carry their index for the KV cache; renumber them to the new positions.
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_index
    getattr(student, student.base_model_prefix).layers = kept
    student.config.num_hidden_layers = len(kept)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in sorted(keep)]
    student.requires_grad_(True)
    student.train()
    return student
