"""One stage: from its settings to a ready DistillationTrainer (objective, hidden-state terms, data mixture)."""

from __future__ import annotations

import math
from torch.utils.data import Dataset

from lmdistill.config import AttentionTerm, ContrastiveTerm, FeatureTerm, LogitTerm, PipelineConfig, StageSettings
from lmdistill.data.mixture import MixtureDataset, RatioSchedule
from lmdistill.errors import ConfigError
from lmdistill.losses import DistillObjective, LossTerm
from lmdistill.train.trainer import AuxTerms


class ListDataset(Dataset):
    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


def logit_terms(stage: StageSettings) -> list[LossTerm]:
    """The stage's logit terms; `alpha` (seed 002) rewrites them as alpha*CE + (1-alpha)*KD."""
    terms = [t for t in stage.losses if isinstance(t, LogitTerm)]
    if stage.alpha is not None:
        kd = next(t for t in terms if t.name != "cross_entropy")
        return [LossTerm(name="cross_entropy", weight=stage.alpha, params={}),
                LossTerm(name=kd.name, weight=1.0 - stage.alpha, params=kd.params())]
    return [LossTerm(name=t.name, weight=t.weight, params=t.params()) for t in terms]


def build_objective(stage: StageSettings) -> DistillObjective:
    return DistillObjective(terms=logit_terms(stage), temperature=stage.temperature, chunk_size=stage.chunk_size)


def build_aux(stage: StageSettings, student, teacher) -> AuxTerms:
    aux = AuxTerms()
    if not any(isinstance(t, (FeatureTerm, AttentionTerm, ContrastiveTerm)) for t in stage.losses):
        return aux
    from lmdistill.losses import build_aux_term

    for term in stage.losses:
        if isinstance(term, (FeatureTerm, AttentionTerm, ContrastiveTerm)):
            if teacher is None:
                raise ConfigError(f"stage {stage.name!r}: the {term.name} loss needs a live teacher")
            setattr(aux, term.name, build_aux_term(term.model_dump(), student.config, teacher.config))
            aux.weights[term.name] = term.weight
    for module in (aux.feature, aux.contrastive):
        if module is not None:
            module.to(next(student.parameters()).device)
    return aux


def stage_draws(config: PipelineConfig, stage: StageSettings, sources: dict[str, list[dict]], world_size: int = 1) -> int:
    """How many examples the stage reads: max_steps worth of batches, or epochs over the mixed sources."""
    per_step = config.stage_value(stage, "batch_size") * config.stage_value(stage, "gradient_accumulation_steps") * world_size
    if stage.max_steps:
        return stage.max_steps * per_step
    total = sum(len(sources[name]) for name in sources)
    return max(per_step, math.ceil(stage.epochs * total))


def stage_sources(stage: StageSettings, sources: dict[str, list[dict]]) -> tuple[dict[str, list[dict]], dict[str, float]]:
    """The sources a stage reads and their weights (all sources, equally, when the stage names none)."""
    weights = dict(stage.mixture.weights)
    if stage.mixture.schedule and stage.mixture.schedule.source not in weights:
        weights[stage.mixture.schedule.source] = 1.0
    if not weights:
        weights = {name: 1.0 for name in sources}
    used = {name: sources[name] for name in weights if weights[name] > 0 or (
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
                          num_draws=stage_draws(config, stage, used, world_size), seed=config.training.seed)


def build_balancer(stage: StageSettings):
    """None for the plain weighted sum; otherwise a balancer that reweighs terms as training goes."""
    if stage.balance == "none":
        return None
    from lmdistill.losses import LossBalancer

    return LossBalancer(mode=stage.balance)
