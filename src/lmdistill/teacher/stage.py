"""How a pipeline stage uses recorded teacher outputs: `teacher_source: cache` and `teacher_source: generations`."""

from __future__ import annotations

import logging
from pathlib import Path

from lmdistill.config import AttentionTerm, ContrastiveTerm, FeatureTerm, PipelineConfig, StageSettings
from lmdistill.data.cache import tokenizer_hash
from lmdistill.data.mixture import ID_STRIDE
from lmdistill.data.tokenize import IGNORE_INDEX
from lmdistill.errors import CacheError, ConfigError
from lmdistill.teacher.cache import eval_key
from lmdistill.teacher.generate import load_generations
from lmdistill.teacher.reader import CacheLookup, TeacherCache

log = logging.getLogger(__name__)

GENERATIONS_SOURCE = "generations"


def cache_dir(config: PipelineConfig, out: str | Path | None = None) -> Path:
    return Path(out or config.teacher_cache.path or Path(config.output_dir) / "teacher_cache")


def generations_path(config: PipelineConfig, out: str | Path | None = None) -> Path:
    return Path(out or config.generation.path or Path(config.output_dir) / "generations.jsonl")


def needs_live_teacher(config: PipelineConfig, stages: list[StageSettings]) -> bool:
    """Whether any of `stages` runs the teacher in-process (a cached stage never does)."""
    if config.student.from_teacher is not None:
        return True  # the student is built from the teacher's layers
    for stage in stages:
        if stage.kind == "finetune" or stage.teacher is not None:
            continue  # no teacher, or one of the stage's own (train/stage_models.py)
        if stage.kind == "non_policy" and not generations_path(config).exists():
            return True  # its generations are written on the fly, by the teacher
        hidden = any(isinstance(t, (FeatureTerm, AttentionTerm, ContrastiveTerm)) for t in stage.losses)
        logit_kd = any(t.name != "cross_entropy" for t in stage.losses)
        if hidden or (logit_kd and stage.teacher_source != "cache"):
            return True
    return False


def stage_training_sources(config: PipelineConfig, prep, stage: StageSettings) -> dict[str, list[dict]]:
    """The sources a stage draws from: the configured ones, or only the teacher's generations (teacher_source:
    generations, and every non_policy stage: seed 003's off-policy stage trains on the teacher's responses)."""
    if stage.teacher_source != "generations" and stage.kind != "non_policy":
        return _with_targets(prep.sources, stage.name)
    if stage.mixture.weights or stage.mixture.schedule:
        raise CacheError(f"stage {stage.name!r} trains on teacher generations only; remove its mixture (the "
                         "generations file is its single source)")
    return {GENERATIONS_SOURCE: load_generations(generations_path(config), tokenizer_hash(prep.tokenizer),
                                                 config.data.max_length, prep.task_type, tokenizer=prep.tokenizer)}


def _with_targets(sources: dict[str, list[dict]], stage_name: str) -> dict[str, list[dict]]:
    """The examples that have something to train on: prompt-only rows (for `generate`) are left out."""
    kept = {name: [ex for ex in rows if any(t != IGNORE_INDEX for t in ex["labels"])] for name, rows in sources.items()}
    empty = [name for name, rows in kept.items() if not rows]
    if empty:
        raise ConfigError(f"stage {stage_name!r} trains on the rows of source(s) {empty}, but they hold prompts only: "
                         "let the teacher answer them (`lmdistill generate CONFIG`, then teacher_source: generations "
                         "or kind: non_policy), or give completions")
    for name, rows in kept.items():
        if len(rows) < len(sources[name]):
            log.info("stage %s: source %s: %d prompt-only rows left out (nothing to train on)", stage_name, name,
                     len(sources[name]) - len(rows))
    return kept


def open_stage_cache(config: PipelineConfig, prep, stage: StageSettings, train_names: list[str],
                     student_vocab_rows: int) -> tuple[CacheLookup, list[dict], int]:
    """Open and check the cache for `stage`, which reads `train_names` (in MixtureDataset order).

    Returns the lookup, the eval examples with example ids (eval sets follow the training sources in the id space),
    and the vocabulary size the losses compare over.
    """
    cache = TeacherCache(cache_dir(config))
    eval_names = list(prep.eval_sets)
    keys = list(train_names) + [eval_key(name) for name in eval_names]
    examples = {name: prep.sources[name] for name in train_names}
    examples |= {eval_key(name): prep.eval_sets[name] for name in eval_names}
    cache.check_run(tokenizer_hash(prep.tokenizer), config.data.max_length, prep.task_type, examples)
    vocab, captured_at = cache.manifest.vocab_size, cache.manifest.temperature
    if cache.manifest.k < vocab and captured_at != stage.temperature:
        # Re-tempering p^(Tc/T) is exact for the kept ids, but the tail bucket only knows its total mass, so its
        # re-tempered share is a rough guess (tail^(Tc/T)); the loss drifts from the live one.
        log.warning("stage %s: KD temperature %s but the cache was captured at %s with k=%d < V=%d; the tail is "
                    "approximate: capture with `lmdistill cache-teacher CONFIG --temperature %s`", stage.name,
                    stage.temperature, captured_at, cache.manifest.k, vocab, stage.temperature)
    if vocab > student_vocab_rows:
        raise CacheError(f"teacher cache {cache.path} covers {vocab} token ids but the student's output layer has "
                         f"{student_vocab_rows} rows; use a student with the teacher's vocabulary")
    positions = {key: {ex["row_id"]: i for i, ex in enumerate(rows)} for key, rows in examples.items()}
    first_eval = len(train_names)
    eval_examples = [{**ex, "example_id": (first_eval + j) * ID_STRIDE + ex["row_id"]}
                     for j, name in enumerate(eval_names) for ex in prep.eval_sets[name]]
    return CacheLookup(cache, keys, positions, config.teacher_cache.tail), eval_examples, vocab
