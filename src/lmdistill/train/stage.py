"""One stage: from its settings to a ready DistillationTrainer (objective, hidden-state terms, data mixture)."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from lmdistill.config import (AttentionTerm, ContrastiveTerm, CrossVocabTerm, FeatureTerm, LogitTerm, PipelineConfig,
                              StageSettings)
from lmdistill.data.mixture import MixtureDataset, RatioSchedule
from lmdistill.errors import ConfigError
from lmdistill.losses import DistillObjective, LossTerm
from lmdistill.losses.registry import ModelDims, build_aux_loss
from lmdistill.train.trainer import AuxTerms

log = logging.getLogger(__name__)

# Seed 003's output names, kept as links next to best/ and final/ of its stage kinds.
SEED_ALIASES = {"non_policy": {"best": "best_model", "final": "final_model"},
                "policy": {"best": "best_policy_model", "final": "final_policy_model"}}


class ListDataset(Dataset):
    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


def logit_terms(stage: StageSettings) -> list[LossTerm]:
    """The stage's logit terms and their weights. `alpha` (with `beta`) weighs the two sides of the objective and
    never drops a listed term nor replaces a written weight: the CE side is cross_entropy at its own weight (added at
    weight 1 when not listed), the KD side every listed KD term at its own weight (default 1). `alpha` alone (as in
    the distillation scripts users come from): alpha * CE side + (1 - alpha) * KD side; `alpha` with `beta`
    (non_policy/policy stages, as the strong-to-weak scripts): alpha * KD side + beta * CE side."""
    terms = [t for t in stage.losses if isinstance(t, LogitTerm)]
    if stage.alpha is None:
        return [LossTerm(name=t.name, weight=t.weight, params=t.params()) for t in terms]
    ce_factor, kd_factor = (stage.beta, stage.alpha) if stage.beta is not None else (stage.alpha, 1.0 - stage.alpha)
    if not any(t.name == "cross_entropy" for t in terms):
        terms = [*terms, LogitTerm(name="cross_entropy")]
    weighted = [LossTerm(name=t.name, weight=t.weight * (ce_factor if t.name == "cross_entropy" else kd_factor),
                         params=t.params()) for t in terms]
    form = "alpha (KD) / beta (CE), as in main_distillation.py," if stage.beta is not None \
        else "alpha (CE) / 1 - alpha (KD)"
    log.info("stage %s: %s gives the weights %s", stage.name, form,
             ", ".join(f"{t.name} {t.weight:g}" for t in weighted))
    return weighted


def build_objective(stage: StageSettings) -> DistillObjective:
    """The stage's logit objective. A stage whose only logit losses are cross-vocabulary ones (uld, cross_vocab_kl,
    computed beside it) gets the student's CE at weight 0: logged, not trained on."""
    terms = logit_terms(stage)
    if not terms and any(isinstance(t, CrossVocabTerm) for t in stage.losses):
        terms = [LossTerm(name="cross_entropy", weight=0.0)]
    return DistillObjective(terms=terms, temperature=stage.temperature, chunk_size=stage.chunk_size)


def _use_eager_attention(model) -> None:
    """Attention maps are only returned by the eager kernel (sdpa/flash never materialise them)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:
        model.config._attn_implementation = "eager"


def model_dims(student_config, teacher_config) -> ModelDims:
    """Widths and layer counts of both models; encoder-decoder configs (T5: num_layers / num_decoder_layers, BART:
    encoder_layers / decoder_layers) also give their decoder's count, so encoder and decoder get their own maps."""

    def width(cfg) -> int:
        return getattr(cfg, "hidden_size", None) or cfg.d_model

    def layers(cfg) -> tuple[int, int | None]:
        if not getattr(cfg, "is_encoder_decoder", False):
            return cfg.num_hidden_layers, None
        encoder = getattr(cfg, "encoder_layers", None) or cfg.num_layers
        return encoder, getattr(cfg, "decoder_layers", None) or cfg.num_decoder_layers

    (s_enc, s_dec), (t_enc, t_dec) = layers(student_config), layers(teacher_config)
    return ModelDims(student_hidden_size=width(student_config), teacher_hidden_size=width(teacher_config),
                     student_layers=s_enc, teacher_layers=t_enc, student_decoder_layers=s_dec,
                     teacher_decoder_layers=t_dec)


def build_aux(stage: StageSettings, student, teacher, seed: int = 0) -> AuxTerms:
    """Feature / attention / contrastive terms with their projections, on the student's device. The projections
    start from `seed` (not from whatever the global generator holds), so every process and every rerun starts them
    alike."""
    aux = AuxTerms()
    specs = [t for t in stage.losses if isinstance(t, (FeatureTerm, AttentionTerm, ContrastiveTerm))]
    if not specs:
        return aux
    if teacher is None:
        raise ConfigError(f"stage {stage.name!r}: the {specs[0].name} loss needs a live teacher")
    dims = model_dims(student.config, teacher.config)
    device = next(student.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        built_terms = [(term, build_aux_loss(term.model_dump(mode="json"), dims)) for term in specs]
    for term, built in built_terms:
        setattr(aux, term.name, built.module.to(device))
        aux.weights[term.name] = built.weight
        if term.name == "attention":
            _use_eager_attention(student)
            _use_eager_attention(teacher)
    return aux


def stage_draws(config: PipelineConfig, stage: StageSettings, sources: dict[str, list[dict]], world_size: int = 1) -> int:
    """How many examples the stage reads: max_steps worth of batches, or epochs over the mixed sources."""
    per_step = config.stage_value(stage, "batch_size") * config.stage_value(stage, "gradient_accumulation_steps") * world_size
    if stage.max_steps:
        return stage.max_steps * per_step
    total = sum(len(sources[name]) for name in sources)
    return max(per_step, math.ceil(stage.epochs * total))


def stage_sources(stage: StageSettings, sources: dict[str, list[dict]]) -> tuple[dict[str, list[dict]], dict[str, float]]:
    """The sources a stage reads and their weights (all sources, in proportion to their rows, when the stage names
    none: a pass over them, an epoch, then reads every row once)."""
    weights = dict(stage.mixture.weights)
    if stage.mixture.schedule and stage.mixture.schedule.source not in weights:
        weights[stage.mixture.schedule.source] = 1.0
    by_size = not weights
    if by_size:
        weights = {name: float(len(rows)) for name, rows in sources.items()}
    used = {name: sources[name] for name in weights if by_size or weights[name] > 0 or (
        stage.mixture.schedule and stage.mixture.schedule.source == name)}
    empty = [name for name, rows in used.items() if not rows]
    if empty:
        raise ConfigError(f"stage {stage.name!r} reads source(s) {empty}, which have no usable rows")
    return used, {name: weights[name] for name in used}


def build_train_dataset(config: PipelineConfig, stage: StageSettings, sources: dict[str, list[dict]],
                        world_size: int = 1) -> MixtureDataset:
    used, weights = stage_sources(stage, sources)
    sched = stage.mixture.schedule
    schedule = RatioSchedule(kind=sched.kind, source=sched.source, start=sched.start, end=sched.end) if sched else None
    return MixtureDataset(sources=used, weights=weights, schedule=schedule,
                          num_draws=stage_draws(config, stage, used, world_size), seed=config.training.seed,
                          round_size=config.stage_value(stage, "batch_size") * world_size)


def build_balancer(stage: StageSettings):
    """None for the plain weighted sum; otherwise a balancer that reweighs terms as training goes."""
    if stage.balance == "none":
        return None
    from lmdistill.losses import LossBalancer

    return LossBalancer(mode=stage.balance)


def write_seed_aliases(stage: StageSettings, stage_dir: Path) -> None:
    """Seed 003's names for a non_policy/policy stage's best/ and final/ (relative links, replaced atomically)."""
    for target, alias in SEED_ALIASES.get(stage.kind, {}).items():
        tmp = stage_dir / f".{alias}.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target, target_is_directory=True)
        os.replace(tmp, stage_dir / alias)
