"""How a pipeline stage uses recorded teacher outputs: `teacher_source: cache` and `teacher_source: generations`."""

from __future__ import annotations

import logging
from pathlib import Path

from lmdistill.config import AttentionTerm, ContrastiveTerm, FeatureTerm, PipelineConfig, StageSettings
from lmdistill.data.align import ALIGNMENT
from lmdistill.data.cache import tokenizer_hash
from lmdistill.data.mixture import ID_STRIDE
from lmdistill.data.tokenize import IGNORE_INDEX
from lmdistill.errors import CacheError, ConfigError
from lmdistill.teacher.cache import eval_key
from lmdistill.teacher.generate import load_generations
from lmdistill.teacher.manifest import CachedTeacher
from lmdistill.teacher.reader import REBUILD, CacheLookup, PairedCacheLookup, TeacherCache

log = logging.getLogger(__name__)

GENERATIONS_SOURCE = "generations"


def cache_dir(config: PipelineConfig, out: str | Path | None = None) -> Path:
    return Path(out or config.teacher_cache.path or Path(config.output_dir) / "teacher_cache")


def generations_path(config: PipelineConfig, out: str | Path | None = None) -> Path:
    return Path(out or config.generation.path or Path(config.output_dir) / "generations.jsonl")


def mixture_teachers(config: PipelineConfig, config_hashes: list[str] | None = None) -> list[CachedTeacher]:
    """The teachers whose mixture a cache of this config holds, as its manifest lists them (empty: one teacher).
    config_hashes: those of the loaded teachers (`cache-teacher`); a run describes them without loading them."""
    if not config.teachers or len(config.teachers) == 1:
        return []
    total = sum(entry.weight for entry in config.teachers)
    # The first teacher is loaded as the run's teacher (its dtype may follow training.bf16).
    settings = [config.teacher, *config.teachers[1:]]
    hashes = config_hashes or [None] * len(settings)
    return [CachedTeacher(name=entry.name, dtype=f"{s.quantization.bits}-bit" if s.quantization else s.dtype,
                          weight=entry.weight / total, sources=list(entry.sources or []), config_hash=h)
            for entry, s, h in zip(config.teachers, settings, hashes)]


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


def _checked_cache(config: PipelineConfig, prep, stage: StageSettings, train_names: list[str],
                   across: bool) -> tuple[TeacherCache, list[str], dict[str, dict[int, int]], list[dict]]:
    """The stage's cache checked against the run: (cache, keys in example-id order, row id -> position per key, the
    eval examples with example ids: eval sets follow the training sources in the id space). across: the stage reads
    a cache captured across tokenizers (uld / cross_vocab_kl), else one over the student's own token ids."""
    cache = TeacherCache(cache_dir(config))
    eval_names = list(prep.eval_sets)
    keys = list(train_names) + [eval_key(name) for name in eval_names]
    examples = {name: prep.sources[name] for name in train_names}
    examples |= {eval_key(name): prep.eval_sets[name] for name in eval_names}
    m = cache.manifest
    if across and m.alignment is None:
        raise CacheError(f"stage {stage.name!r} reads uld / cross_vocab_kl from teacher cache {cache.path}, but it "
                         "holds the teacher's log-probs over the student's own token ids (teacher and student "
                         "shared a tokenizer at capture); with one tokenizer use forward_kl with teacher_source: "
                         "cache, or rebuild the cache with the teacher of another tokenizer")
    if not across and m.alignment is not None:
        raise CacheError(f"teacher cache {cache.path} was captured across tokenizers (the top-k over teacher "
                         f"{m.teacher!r}'s own ids, at aligned positions): only uld / cross_vocab_kl read it; set "
                         f"stage {stage.name!r}'s losses to [{{name: uld}}] or [{{name: cross_vocab_kl}}]")
    if across and m.alignment != ALIGNMENT:
        raise CacheError(f"teacher cache {cache.path} paired its positions by the rule {m.alignment!r}, this version "
                         f"pairs them by {ALIGNMENT!r}: rebuild it with `lmdistill cache-teacher CONFIG`")
    cache.check_run(tokenizer_hash(prep.tokenizer), config.data.max_length, prep.task_type, examples,
                    tokenizer_name=config.student.name or config.teacher.name)
    cache.check_teachers(mixture_teachers(config), stage.temperature)
    if m.k < m.vocab_size and m.temperature != stage.temperature:
        # Re-tempering p^(Tc/T) is exact for the kept ids, but the tail is only known as a total, so its re-tempered
        # share is a rough guess; the loss drifts from the live one.
        log.warning("stage %s: KD temperature %s but the cache was captured at %s with k=%d < V=%d; the tail is "
                    "approximate: capture with `lmdistill cache-teacher CONFIG --temperature %s`", stage.name,
                    stage.temperature, m.temperature, m.k, m.vocab_size, stage.temperature)
    positions = {key: {ex["row_id"]: i for i, ex in enumerate(rows)} for key, rows in examples.items()}
    first_eval = len(train_names)
    eval_examples = [{**ex, "example_id": (first_eval + j) * ID_STRIDE + ex["row_id"]}
                     for j, name in enumerate(eval_names) for ex in prep.eval_sets[name]]
    return cache, keys, positions, eval_examples


def open_stage_cache(config: PipelineConfig, prep, stage: StageSettings, train_names: list[str],
                     student_vocab_rows: int) -> tuple[CacheLookup, list[dict], int]:
    """Open and check the cache for `stage`, which reads `train_names` (in MixtureDataset order).

    Returns the lookup, the eval examples with example ids, and the vocabulary size the losses compare over.
    """
    cache, keys, positions, eval_examples = _checked_cache(config, prep, stage, train_names, across=False)
    vocab = cache.manifest.vocab_size
    if vocab > student_vocab_rows:
        raise CacheError(f"teacher cache {cache.path} covers {vocab} token ids but the student's output layer has "
                         f"{student_vocab_rows} rows; use a student with the teacher's vocabulary")
    return CacheLookup(cache, keys, positions, config.teacher_cache.tail), eval_examples, vocab


def open_paired_cache(config: PipelineConfig, prep, stage: StageSettings, train_names: list[str],
                      teacher_tokenizer_hash: str) -> tuple[PairedCacheLookup, list[dict]]:
    """`open_stage_cache` for uld / cross_vocab_kl: a cache captured across tokenizers, by the teacher whose
    tokenizer has `teacher_tokenizer_hash`. Returns the lookup and the eval examples with example ids."""
    cache, keys, positions, eval_examples = _checked_cache(config, prep, stage, train_names, across=True)
    if cache.manifest.teacher_tokenizer_hash != teacher_tokenizer_hash:
        raise CacheError(f"teacher cache {cache.path} holds the top-k over the ids of teacher "
                         f"{cache.manifest.teacher!r}'s tokenizer, but this run's teacher {config.teacher.name!r} "
                         f"has another tokenizer; its ids would not match: {REBUILD}")
    return PairedCacheLookup(cache, keys, positions), eval_examples
