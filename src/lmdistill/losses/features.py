"""Feature (hidden-state) distillation: MSE or cosine between mapped layers, with trainable projections."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmdistill.losses.errors import LossConfigError
from lmdistill.losses.layers import layer_outputs, resolve_layer_map

FEATURE_KINDS = ("mse", "cosine")


def masked_token_mean(values: Tensor, attention_mask: Tensor | None) -> Tensor:
    """values [B, T] -> mean over tokens whose attention_mask [B, T] is 1 (0 when none are)."""
    if attention_mask is None:
        return values.mean()
    mask = attention_mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


class FeatureDistiller(nn.Module):
    """Matches student hidden states to the teacher's on mapped layers.

    A trainable Linear(d_s, d_t) per layer pair maps student width to teacher width when they differ (identity
    otherwise); these projections are this module's parameters, so the trainer optimises and saves them with
    the student. `kind="mse"`: mean squared error per token, averaged over features; `"cosine"`: 1 - cosine
    similarity per token. Averaged over layer pairs, then over the tokens of the mask (the trainer passes the
    response tokens, those the logit terms count).
    """

    requires = "hidden_states"

    def __init__(self, student_hidden_size: int, teacher_hidden_size: int, student_layers: int, teacher_layers: int,
                 layers: str | Sequence[Sequence[int]] = "uniform", kind: str = "mse") -> None:
        super().__init__()
        if kind not in FEATURE_KINDS:
            raise LossConfigError(f"feature loss kind must be one of {FEATURE_KINDS}, got {kind!r}")
        self.kind = kind
        self.student_layers, self.teacher_layers = student_layers, teacher_layers
        self.layer_map = resolve_layer_map(layers, student_layers, teacher_layers)
        same = student_hidden_size == teacher_hidden_size
        self.projections = nn.ModuleList(
            nn.Identity() if same else nn.Linear(student_hidden_size, teacher_hidden_size) for _ in self.layer_map)

    def forward(self, student_states: Sequence[Tensor], teacher_states: Sequence[Tensor],
                attention_mask: Tensor | None = None) -> Tensor:
        """student_states / teacher_states: `output_hidden_states=True` tuples of [B, T, d] (index 0 = embeddings,
        not used); attention_mask [B, T]. Returns a scalar."""
        student_states = layer_outputs(student_states, self.student_layers, "hidden_states", "student", 1)
        teacher_states = layer_outputs(teacher_states, self.teacher_layers, "hidden_states", "teacher", 1)
        losses = []
        for (s, t), proj in zip(self.layer_map, self.projections):
            weight = getattr(proj, "weight", None)
            dtype = weight.dtype if weight is not None else torch.float32
            student = proj(student_states[s + 1].to(dtype)).float()  # [B, T, d_t]
            teacher = teacher_states[t + 1].float()  # [B, T, d_t]
            if self.kind == "mse":
                per_token = (student - teacher).pow(2).mean(-1)  # [B, T]
            else:
                per_token = 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)  # [B, T]
            losses.append(masked_token_mean(per_token, attention_mask))
        return torch.stack(losses).mean()


class EncoderDecoderFeatureDistiller(nn.Module):
    """Feature loss for encoder-decoder models (T5, BART): encoder states and decoder states each get their own
    FeatureDistiller (own layer map, own projections), built from the same `layers` rule and `kind`.

    Encoder states are averaged over source tokens (the encoder attention mask), decoder states over target tokens
    (the decoder label mask). The loss is the mean of the two sides, so each side weighs the same whatever its layer
    count. An explicit `layers` list applies to both sides and must fit both.
    """

    requires = "hidden_states"

    def __init__(self, student_hidden_size: int, teacher_hidden_size: int, student_layers: tuple[int, int],
                 teacher_layers: tuple[int, int], layers: str | Sequence[Sequence[int]] = "uniform",
                 kind: str = "mse") -> None:
        """student_layers / teacher_layers: (encoder layers, decoder layers)."""
        super().__init__()
        sides = {}
        for n, side in enumerate(("encoder", "decoder")):
            try:
                sides[side] = FeatureDistiller(student_hidden_size, teacher_hidden_size, student_layers[n],
                                               teacher_layers[n], layers, kind)
            except LossConfigError as err:
                raise LossConfigError(f"feature loss, {side} states: {err}") from err
        self.encoder, self.decoder = sides["encoder"], sides["decoder"]

    def forward(self, student_encoder: Sequence[Tensor], teacher_encoder: Sequence[Tensor], encoder_mask: Tensor,
                student_decoder: Sequence[Tensor], teacher_decoder: Sequence[Tensor], decoder_mask: Tensor) -> Tensor:
        """*_encoder: encoder hidden-state tuples of [B, S, d] with encoder_mask [B, S] (1 = source token);
        *_decoder: decoder hidden-state tuples of [B, T, d] with decoder_mask [B, T] (1 = counted label).
        Index 0 of each tuple holds the embeddings (not used). Returns a scalar."""
        return 0.5 * (self.encoder(student_encoder, teacher_encoder, encoder_mask)
                      + self.decoder(student_decoder, teacher_decoder, decoder_mask))
