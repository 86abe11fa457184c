"""The generations a run trains on: written with a loaded teacher, or checked on disk (below train/, which calls
it; the commands that load the teacher live in train/teacher_commands.py)."""

from __future__ import annotations

import logging
from pathlib import Path

from lmdistill.config import GenerationSettings, PipelineConfig
from lmdistill.data.cache import tokenizer_hash
from lmdistill.data.completion import text_prompt_length, text_prompt_words
from lmdistill.errors import ConfigError
from lmdistill.teacher.generate import generate_responses, missing_generations
from lmdistill.teacher.ranks import ONE_PROCESS, Processes
from lmdistill.teacher.retokenize import teacher_sources
from lmdistill.teacher.sampling import samples_per_prompt
from lmdistill.teacher.stage import generations_path
from lmdistill.teacher.thinking import thinking_modes

log = logging.getLogger(__name__)


def generation_sources(config: PipelineConfig, settings: GenerationSettings) -> list[str]:
    names = settings.sources or list(config.data.sources)
    unknown = [name for name in names if name not in config.data.sources]
    if unknown:
        raise ConfigError(f"generation.sources names {unknown}, but data.sources has {sorted(config.data.sources)}")
    return names


def write_generations(config: PipelineConfig, prep, settings: GenerationSettings | None = None,
                      out: str | Path | None = None, processes: Processes = ONE_PROCESS) -> tuple[Path, int]:
    """Write (or finish: the file is resumable) the generations with the teacher `prep` holds; (path, lines this
    process wrote now)."""
    settings = settings or config.generation
    names = generation_sources(config, settings)
    path = generations_path(config, out)
    # Across tokenizers the teacher is prompted in its own tokens and chat template, rendered from the same messages.
    tokenizer = prep.teacher_tokenizer or prep.tokenizer
    sources = teacher_sources(config, tokenizer, prep.task_type, names) if prep.teacher_tokenizer is not None \
        else {name: prep.sources[name] for name in names}
    sources = {name: [with_text_prompt(ex, settings) for ex in rows] for name, rows in sources.items()}
    for name, rows in sources.items():
        texts = sum("text_tokens" in ex for ex in rows)
        if texts:
            log.info("generate: %d rows of source %s are plain text; the teacher continues each from %s "
                     "(generation.text_prompt_fraction / text_prompt_tokens)", texts, name,
                     text_prompt_words(settings.text_prompt_fraction, settings.text_prompt_tokens))
    modes = thinking_modes(tokenizer, settings, config.training.seed) if prep.task_type == "causal" else None
    written = generate_responses(prep.teacher, tokenizer, sources, path, task_type=prep.task_type, settings=settings,
                                 seed=config.training.seed, teacher_name=config.teacher.name,
                                 tokenizer_id=tokenizer_hash(tokenizer), modes=modes, processes=processes)
    return path, written


def with_text_prompt(example: dict, settings: GenerationSettings) -> dict:
    """A plain-text example with the first part of its text as the prompt the teacher continues (see
    generation.text_prompt_fraction); other examples as they are."""
    if "text_tokens" not in example:
        return example
    return {**example, "prompt_length": text_prompt_length(example, settings.text_prompt_fraction,
                                                           settings.text_prompt_tokens)}


def ensure_generations(config: PipelineConfig, prep, processes: Processes = ONE_PROCESS) -> Path:
    """The generations an off-policy (non_policy) stage trains on: written or finished now when the run has the
    teacher loaded (each of the `processes` generating its share of the batches, as `lmdistill generate` does), used
    as they are when it has not (a stage whose losses need no teacher)."""
    from lmdistill.models.sharding import is_sharded

    path = generations_path(config)
    if is_sharded(prep.teacher):
        # Generation splits the prompts over the processes, which a sharded teacher (collective forwards) cannot.
        names = generation_sources(config, config.generation)
        missing = missing_generations(path, {name: prep.sources[name] for name in names},
                                      samples_per_prompt(config.generation), prep.task_type)
        if missing:
            raise ConfigError(f"the non_policy stage trains on teacher generations, but {path} lacks {missing} rows and "
                              "the teacher is sharded over the processes: run `lmdistill generate CONFIG` first (it "
                              "loads a whole teacher per process), or set teacher.shard: never")
        return path
    if prep.teacher is not None:
        return write_generations(config, prep, processes=processes)[0]
    if not path.exists():
        raise ConfigError(f"the non_policy stage trains on teacher generations, but {path} does not exist and the "
                          "run loads no teacher: run `lmdistill generate CONFIG` first, or set teacher.name")
    return path
