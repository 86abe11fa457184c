"""Which student layer learns from which teacher layer (feature and attention losses)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

from lmdistill.losses.errors import LossConfigError, LossInputError

LayerPairs = list[tuple[int, int]]  # (student layer, teacher layer), 0-based transformer layers


def resolve_layer_map(layers: str | Sequence[Sequence[int]], student_layers: int, teacher_layers: int) -> LayerPairs:
    """`"uniform"`: student layer i <-> teacher layer round((i+1) * Lt / Ls) - 1 (rounded half up), so the last
    layers meet; or an explicit list of [student, teacher] pairs. Layers count from 0, embeddings excluded."""
    if student_layers < 1 or teacher_layers < 1:
        raise LossConfigError(f"layer counts must be >= 1, got student {student_layers}, teacher {teacher_layers}")
    if layers == "uniform":
        return [(i, math.floor((i + 1) * teacher_layers / student_layers + 0.5) - 1) for i in range(student_layers)]
    if isinstance(layers, str) or not layers:
        raise LossConfigError(f"layers must be 'uniform' or a non-empty list of [student, teacher] pairs, "
                              f"got {layers!r}")
    pairs: LayerPairs = []
    for n, pair in enumerate(layers):
        if len(pair) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair):
            raise LossConfigError(f"layers[{n}] = {pair!r}: each entry must be [student_layer, teacher_layer]")
        s, t = pair
        if not (0 <= s < student_layers and 0 <= t < teacher_layers):
            raise LossConfigError(f"layers[{n}] = [{s}, {t}]: student layers are 0..{student_layers - 1} and "
                                  f"teacher layers 0..{teacher_layers - 1} (embeddings are not a layer)")
        pairs.append((s, t))
    return pairs


def layer_outputs(states: Sequence[Tensor] | None, layers: int, what: str, who: str, offset: int) -> Sequence[Tensor]:
    """Check a model's per-layer tuple (`offset` = 1 when index 0 holds the embeddings) and return it."""
    if states is None:
        raise LossInputError(f"{who} {what} are missing: call the model with output_{what}=True"
                             + (" and attn_implementation='eager'" if what == "attentions" else ""))
    if len(states) != layers + offset:
        raise LossInputError(f"{who} {what} hold {len(states)} entries but the loss was built for {layers} layers "
                             f"(+{offset} for embeddings); build it from this model's config")
    return states
