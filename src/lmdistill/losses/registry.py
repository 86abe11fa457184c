"""Build every loss from plain dicts, as a config names them.

    {"name": "jsd", "weight": 0.7, "beta": 0.5}                     -> a logit term of the DistillObjective
    {"name": "feature", "weight": 0.1, "kind": "mse", "layers": "uniform"}
    {"name": "attention", "weight": 0.05, "heads": "auto"}
    {"name": "contrastive", "weight": 0.05, "temperature": 0.1}
    {"name": "attention", "sides": ["encoder", "cross"]}            (sides: encoder-decoder models only)

Logit terms become one `DistillObjective`; the others become modules (`AuxLoss`) that take the models'
hidden-state or attention tuples. Model sizes come from `ModelDims` (read them from the two model configs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from lmdistill.losses.attention import AttentionDistiller, EncoderDecoderAttentionDistiller
from lmdistill.losses.contrastive import ContrastiveDistiller, EncoderDecoderContrastiveDistiller
from lmdistill.losses.errors import LossConfigError
from lmdistill.losses.features import EncoderDecoderFeatureDistiller, FeatureDistiller
from lmdistill.losses.functional import LOGIT_LOSSES
from lmdistill.losses.objective import DistillObjective, LossTerm


@dataclass(frozen=True)
class ModelDims:
    """The sizes the auxiliary losses are built from (hidden_size / num_hidden_layers of each model config).

    For encoder-decoder models `*_layers` count the encoder's layers and `*_decoder_layers` the decoder's; they
    stay None for causal LMs."""

    student_hidden_size: int
    teacher_hidden_size: int
    student_layers: int
    teacher_layers: int
    student_decoder_layers: int | None = None
    teacher_decoder_layers: int | None = None

    @property
    def encoder_decoder(self) -> bool:
        return self.student_decoder_layers is not None


def _feature(d: ModelDims, params: dict[str, Any]) -> nn.Module:
    if d.encoder_decoder:
        return EncoderDecoderFeatureDistiller(
            d.student_hidden_size, d.teacher_hidden_size, (d.student_layers, d.student_decoder_layers),
            (d.teacher_layers, d.teacher_decoder_layers), **params)
    return FeatureDistiller(d.student_hidden_size, d.teacher_hidden_size, d.student_layers, d.teacher_layers, **params)


def _causal_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """A causal LM has one stack, so `sides` (None when a config leaves it unset) has nothing to choose from."""
    sides = params.pop("sides", None)
    if sides is not None:
        raise LossConfigError(f"loss '{name}': sides {sides!r} applies to encoder-decoder models only; these models "
                              f"are causal LMs: remove sides")
    return params


def _attention(d: ModelDims, params: dict[str, Any]) -> nn.Module:
    if d.encoder_decoder:
        return EncoderDecoderAttentionDistiller((d.student_layers, d.student_decoder_layers),
                                                (d.teacher_layers, d.teacher_decoder_layers), **params)
    return AttentionDistiller(d.student_layers, d.teacher_layers, **_causal_params("attention", params))


def _contrastive(d: ModelDims, params: dict[str, Any]) -> nn.Module:
    if d.encoder_decoder:
        return EncoderDecoderContrastiveDistiller(d.student_hidden_size, d.teacher_hidden_size, **params)
    return ContrastiveDistiller(d.student_hidden_size, d.teacher_hidden_size,
                                **_causal_params("contrastive", params))


AuxFactory = Callable[[ModelDims, dict[str, Any]], nn.Module]
AUX_LOSSES: dict[str, tuple[tuple[str, ...], AuxFactory]] = {
    "feature": (("kind", "layers"), _feature),
    "attention": (("layers", "heads", "sides"), _attention),
    "contrastive": (("temperature", "proj_dim", "sides"), _contrastive),
}
LOSS_NAMES = (*LOGIT_LOSSES, *AUX_LOSSES)


@dataclass
class AuxLoss:
    """A non-logit loss: `module(student_states, teacher_states, attention_mask)` where the states are the
    models' `module.requires` outputs ("hidden_states" or "attentions"). Encoder-decoder modules take the encoder's
    (student, teacher, encoder mask) then the decoder's (student, teacher, decoder label mask), and the attention
    module the cross-attention (student, teacher) last."""

    name: str
    weight: float
    module: nn.Module

    @property
    def requires(self) -> str:
        return self.module.requires


@dataclass
class BuiltLosses:
    objective: DistillObjective | None  # None when the config has only auxiliary losses
    aux: list[AuxLoss]

    def trainable_modules(self) -> nn.ModuleDict:
        """The auxiliary modules with parameters (projections): add them to the optimiser and save them."""
        return nn.ModuleDict({a.name: a.module for a in self.aux if any(True for _ in a.module.parameters())})


def _weight(spec: Mapping[str, Any]) -> float:
    weight = spec.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise LossConfigError(f"loss '{spec['name']}': weight must be a finite number >= 0, got {weight!r}")
    return float(weight)


def build_aux_loss(spec: Mapping[str, Any], dims: ModelDims) -> AuxLoss:
    name = spec["name"]
    allowed, factory = AUX_LOSSES[name]
    params = {k: v for k, v in spec.items() if k not in ("name", "weight")}
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise LossConfigError(f"loss '{name}': unknown parameter(s) {', '.join(unknown)}; "
                              f"accepted: {', '.join(allowed)}")
    return AuxLoss(name, _weight(spec), factory(dims, params))


def build_losses(specs: Sequence[Mapping[str, Any]], dims: ModelDims | None = None, temperature: float = 1.0,
                 chunk_size: int | None = None) -> BuiltLosses:
    """Config entries -> one DistillObjective (logit terms) plus auxiliary loss modules. `dims` is needed only
    when an auxiliary loss is named."""
    terms, aux = [], []
    for n, spec in enumerate(specs):
        name = spec.get("name")
        if name in LOGIT_LOSSES:
            terms.append(LossTerm.from_dict(spec))
        elif name in AUX_LOSSES:
            if dims is None:
                raise LossConfigError(f"losses[{n}] '{name}' needs the models' sizes (ModelDims)")
            aux.append(build_aux_loss(spec, dims))
        else:
            raise LossConfigError(f"losses[{n}]: unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}")
    if not terms and not aux:
        raise LossConfigError("no losses configured; add e.g. {name: forward_kl}")
    if len({a.name for a in aux}) != len(aux):
        raise LossConfigError(f"auxiliary losses repeat in {[a.name for a in aux]}; list each once")
    objective = DistillObjective(terms, temperature, chunk_size) if terms else None
    return BuiltLosses(objective, aux)
