"""The `cache-teacher` and `generate` commands: config in, teacher outputs on disk (the CLI stays a thin parser).
They load the run's data and teacher as a training run does, so they sit in train/, above teacher/."""

from __future__ import annotations

from pathlib import Path

from lmdistill.config import PipelineConfig, TeacherSettings
from lmdistill.data.align import ALIGNMENT
from lmdistill.data.cache import tokenizer_hash
from lmdistill.errors import ConfigError
from lmdistill.models.load import load_tokenizer
from lmdistill.models.vocab import same_vocab
from lmdistill.teacher.cache import CacheInputs, build_cache, eval_key
from lmdistill.teacher.chain_rules import uses_run_teachers
from lmdistill.teacher.fingerprint import model_config_hash
from lmdistill.teacher.generations import generation_sources, write_generations
from lmdistill.teacher.manifest import Manifest
from lmdistill.teacher.stage import cache_dir, mixture_teachers
from lmdistill.train.cross_tokenizer import teacher_views
from lmdistill.train.prepare import prepare, student_tokenizer_name
from lmdistill.train.processes import launched_processes
from lmdistill.train.served import served_teacher
from lmdistill.train.stage_models import run_teachers


def with_endpoint(config: PipelineConfig, endpoint: str | None) -> PipelineConfig:
    """The config with teacher.endpoint set (--teacher-endpoint), validated as the config file would be."""
    if endpoint is None:
        return config
    teacher = TeacherSettings.model_validate({**config.teacher.model_dump(), "endpoint": endpoint})
    return config.model_copy(update={"teacher": teacher})


def _prepare_with_teacher(config: PipelineConfig, command: str):
    """(prepared run with its teacher, the launched processes). The processes are set up first, so that under
    torchrun on GPUs each one loads its teacher onto its own device."""
    if not config.teacher.name:
        raise ConfigError(f"`lmdistill {command}` runs the teacher, but teacher.name is not set in the config")
    processes = launched_processes(config)
    if config.teacher.endpoint:
        return served_teacher(config, prepare(config, load_teacher=False), vocab_check=command != "generate"), \
            processes
    # Generations are text: a teacher with another tokenizer is prompted in its own (see write_generations).
    prep = prepare(config, load_teacher=True, vocab_check=command != "generate")
    if prep.teacher is None:
        raise ConfigError(f"`lmdistill {command}`: every stage is a finetune stage, so the config loads no "
                          "teacher; add a distill stage or use a config that distills")
    return prep, processes


def _same_tokenizer(config: PipelineConfig) -> bool:
    student = config.student if config.student.name else config.teacher
    return same_vocab(load_tokenizer(config.teacher.name, config.teacher.trust_remote_code),
                      load_tokenizer(student_tokenizer_name(config), student.trust_remote_code))


def cache_teacher(config: PipelineConfig, out: str | Path | None = None, k: int | None = None,
                  temperature: float | None = None) -> tuple[Path, Manifest]:
    """Capture (or finish capturing) the top-k teacher cache for every training source and eval set: of the teacher,
    or with several teachers of the target the cached stages train on (their mixture, or a routed source's teacher);
    under several processes each captures its share of the shards. A teacher with another tokenizer reads its own
    tokens and is captured at the positions aligned with the student's (lmdistill.teacher.cache)."""
    settings = config.teacher_cache.model_copy()
    if k is not None:
        settings.k = k
    if temperature is not None:
        settings.temperature = temperature
    if config.teacher.endpoint and settings.temperature != 1.0:
        raise ConfigError(f"teacher_cache.temperature is {settings.temperature}, but a teacher server returns "
                          "log-probs at temperature 1: capture with --temperature 1 (stages re-temper the kept "
                          "log-probs)")
    if config.teacher.endpoint and config.teacher.name and not _same_tokenizer(config):
        raise ConfigError("`lmdistill cache-teacher` across tokenizers runs the teacher on its own tokens, which a "
                          "teacher server is not asked for: remove teacher.endpoint (or --teacher-endpoint) to "
                          "capture with the teacher loaded here")
    several = bool(mixture_teachers(config))
    if several:
        _check_mixture_capture(config, settings.temperature)
    prep, processes = _prepare_with_teacher(config, "cache-teacher")
    vocab = prep.shared_vocab or prep.teacher.get_output_embeddings().weight.shape[0]
    train, evals = prep.sources, prep.eval_sets
    if prep.teacher_tokenizer is not None:
        # uld / cross_vocab_kl: the teacher reads its own tokens; rows are the pairs aligned with the student's.
        train, evals = teacher_views(config, prep, prep.teacher_tokenizer, train, "`lmdistill cache-teacher` "
                                     "across tokenizers")
    sources = dict(train) | {eval_key(name): rows for name, rows in evals.items()}
    groups = {name: "train" for name in train} | {eval_key(name): "eval" for name in evals}
    inputs = CacheInputs(sources=sources, groups=groups, task_type=prep.task_type, max_length=config.data.max_length,
                         vocab_size=vocab, pad_token_id=prep.tokenizer.pad_token_id, teacher_name=config.teacher.name,
                         teacher_config_hash=model_config_hash(prep.teacher.config),
                         tokenizer_hash=tokenizer_hash(prep.tokenizer),
                         student_tokenizer=student_tokenizer_name(config))
    if prep.teacher_tokenizer is not None:
        inputs.teacher_tokenizer_hash, inputs.alignment = tokenizer_hash(prep.teacher_tokenizer), ALIGNMENT
        inputs.teacher_pad_token_id = prep.teacher_tokenizer.pad_token_id
    teacher = prep.teacher
    if several:
        # The target the cached stages train on: the teachers' mixture formed at the capture temperature (their
        # temperature, checked at load), or a routed source's own teacher.
        teacher = run_teachers(config, prep, settings.temperature)
        inputs.teachers = mixture_teachers(config, [model_config_hash(t.config) for t in teacher.teachers])
    if config.teacher.endpoint:
        inputs.endpoint, inputs.served_model = prep.teacher.url, prep.teacher.served_model
    out_dir = cache_dir(config, out)
    return out_dir, build_cache(teacher, inputs, settings, out_dir, processes)


def _check_mixture_capture(config: PipelineConfig, temperature: float) -> None:
    if config.teacher.endpoint:
        raise ConfigError("several teachers are mixed in this process, but --teacher-endpoint / teacher.endpoint "
                          "asks a server for one teacher: drop the endpoint to capture their mixture")
    trained_at = sorted({stage.temperature for stage in config.stages
                         if stage.teacher_source == "cache" and uses_run_teachers(stage)})
    if trained_at and trained_at != [temperature]:
        raise ConfigError(f"the cached stages train on the teachers' mixture at temperature {trained_at[0]}, and a "
                          f"mixture captured at {temperature} cannot be re-tempered: drop --temperature (the "
                          f"capture uses teacher_cache.temperature, {config.teacher_cache.temperature})")


def generate(config: PipelineConfig, num_samples: int | None = None, max_new_tokens: int | None = None,
             out: str | Path | None = None) -> tuple[Path, int]:
    """Teacher generations for the prompts of generation.sources (default: every training source); under several
    processes each generates its share of the batches. Returns (path, lines this process wrote)."""
    settings = config.generation.model_copy()
    if num_samples is not None:
        settings.num_samples = num_samples
    if max_new_tokens is not None:
        settings.max_new_tokens = max_new_tokens
    generation_sources(config, settings)
    prep, processes = _prepare_with_teacher(config, "generate")
    return write_generations(config, prep, settings, out, processes)
