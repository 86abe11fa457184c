"""What every stage of a run shares, loaded once: the student's tokenizer and task type, the teacher (or its
tokenizer where the two differ), the vocabulary check, the encoded data and eval sets, and the student a stage
starts from. The stage loop itself is pipeline.py."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmdistill.config import PipelineConfig, StudentSettings
from lmdistill.data.cache import encode_source
from lmdistill.data.completion import resolve_layout
from lmdistill.data.formats import load_source
from lmdistill.data.holdout import split_holdout
from lmdistill.data.tokenize import Layout
from lmdistill.errors import ConfigError
from lmdistill.models.load import detect_task_type, frozen_teacher, load_tokenizer, resolve_device
from lmdistill.models.vocab import check_same_vocab, same_vocab
from lmdistill.teacher.retokenize import needs_shared_vocab
from lmdistill.train.args import check_precision, check_reporting
from lmdistill.train.processes import launched_processes, main_writes
from lmdistill.train.stage_models import STUDENT_INIT_DIR, TeacherPool, build_student_init

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """What every stage shares: loaded once per run."""

    task_type: str
    tokenizer: object
    sources: dict[str, list[dict]]
    eval_sets: dict[str, list[dict]]
    teacher: torch.nn.Module | None
    shared_vocab: int | None
    device: torch.device
    data_report: dict[str, dict] = field(default_factory=dict)
    student: StudentSettings | None = None  # how this run loads its student (see saved_student_init)
    # The teacher's own tokenizer when its vocabulary differs from the student's (None: they share one).
    teacher_tokenizer: object | None = None
    pool: TeacherPool = field(default_factory=TeacherPool)  # teachers besides `teacher` (train/stage_models.py)
    # The teacher on a server (teacher.endpoint; `teacher` is then None): stages ask it as they train (served.py).
    served: object | None = None
    # The launched processes each teacher may be split over, as its `shard` setting says (1: whole teachers).
    teacher_processes: int = 1

    @property
    def scoring_teacher(self) -> torch.nn.Module | None:
        """The teacher where it reads the student's token ids (evaluation, samples); None across tokenizers."""
        return self.teacher if self.teacher_tokenizer is None else None


def student_tokenizer_name(config: PipelineConfig) -> str:
    name = config.student.name or config.teacher.name
    if not name:
        raise ConfigError("student.name is not set (and no teacher to build it from); set student.name or teacher.name")
    return name


def student_trusts_remote_code(config: PipelineConfig) -> bool:
    """trust_remote_code for the student's tokenizer and config (it covers them as well as the weights): the
    student's, or the teacher's when the student is built from the teacher."""
    return (config.student if config.student.name else config.teacher).trust_remote_code


def load_data(config: PipelineConfig, tokenizer, task_type: str, eval_only: bool = False) -> tuple[dict, dict, dict]:
    """(sources, eval sets, per-set report), encoded. eval_only: the training sources are read only when the eval
    sets are held out of them (`lmdistill eval`)."""
    sources, eval_sets, report = {}, {}, {}
    groups = [("sources", sources, None), ("eval", eval_sets, config.data.eval_max_rows)]
    for group, target, max_rows_default in groups[1:] if eval_only and config.data.eval else groups:
        for name, settings in getattr(config.data, group).items():
            loaded = load_source(settings.path, format=settings.format, split=settings.split,
                                 max_rows=settings.max_rows or max_rows_default, strict=config.data.strict,
                                 columns=settings.columns)
            layout = Layout(config.data.max_length, task_type, config.data.train_on, config.data.text_overlap,
                            task_type == "causal" and resolve_layout(settings.layout, loaded.rows, tokenizer,
                                                                       name) == "completion")
            encoded = encode_source(loaded.rows, tokenizer, layout, name, strict=config.data.strict,
                                    cache_dir=config.data.cache_dir, num_proc=config.data.num_proc,
                                    use_cache=config.data.tokenized_cache)
            target[name] = encoded.examples
            skipped = dict(loaded.skipped) | {k: v + loaded.skipped.get(k, 0) for k, v in encoded.skipped.items()}
            report[name] = {"format": loaded.format, "rows": len(loaded.rows) + sum(loaded.skipped.values()),
                            "kept": len(encoded.examples), "skipped": skipped,
                            "ignored_columns": loaded.ignored_columns, "windows": encoded.windows}
            if skipped:
                firsts = (loaded.first_skipped + encoded.first_skipped)[:3]
                log.warning("source %s: skipped %s; first: %s", name, skipped, firsts)
    if not config.data.eval and config.data.eval_holdout:
        for name in sources:
            sources[name], held = split_holdout(sources[name], config.data.eval_holdout, config.data.eval_max_rows,
                                                config.training.seed, name)
            report[name]["held_out"] = len(held)
            if held:
                eval_sets[name] = held
        log.info("no eval set given: held out %s for evaluation (data.eval_holdout %s, never trained on)",
                 ", ".join(f"{rep['held_out']} rows of {name}" for name, rep in report.items()),
                 config.data.eval_holdout)
    return sources, eval_sets, report


def prepare(config: PipelineConfig, load_teacher: bool = True, shard_teacher: bool = False,
            vocab_check: bool = True) -> Prepared:
    """shard_teacher: split each teacher over the launched processes when its `shard` setting says so (training
    runs; the one-process commands keep them whole). vocab_check=False: a teacher with another vocabulary is accepted
    whatever the stages' losses (`generate` only needs its text)."""
    check_precision(config)
    check_reporting(config)
    device = resolve_device("auto", no_cuda=config.training.no_cuda)
    student_name = student_tokenizer_name(config)
    trust = student_trusts_remote_code(config)
    task_type = config.task_type if config.task_type != "auto" else detect_task_type(student_name, trust)
    tokenizer = load_tokenizer(student_name, trust)
    teacher, shared_vocab, other_tokenizer = None, None, None
    teacher_processes = launched_processes(config).num_processes if shard_teacher else 1
    if load_teacher and config.teacher.name:
        teacher_tokenizer = load_tokenizer(config.teacher.name, config.teacher.trust_remote_code)
        teacher_device = resolve_device(config.teacher.device, no_cuda=config.training.no_cuda)
        teacher = frozen_teacher(config.teacher, task_type, device=teacher_device, processes=teacher_processes)
        needed_by = needs_shared_vocab(config) if vocab_check else None
        if same_vocab(teacher_tokenizer, tokenizer) or needed_by:
            student_rows = teacher.get_output_embeddings().weight.shape[0]
            if config.student.name:
                from transformers import AutoConfig

                student_rows = AutoConfig.from_pretrained(
                    config.student.name, trust_remote_code=config.student.trust_remote_code).vocab_size
            shared_vocab = check_same_vocab(teacher_tokenizer, tokenizer,
                                            teacher.get_output_embeddings().weight.shape[0], student_rows,
                                            needed_by=needed_by or "logit distillation")
        else:
            # Across tokenizers the teacher reads its own rendering of the data (generations, cross-vocab losses).
            other_tokenizer = teacher_tokenizer
            log.info("teacher and student tokenizers differ: the teacher reads the data in its own tokens")
    elif config.needs_teacher and load_teacher:
        raise ConfigError("the stages distill from a teacher, but teacher.name is not set (or use --teacher_model)")
    sources, eval_sets, report = load_data(config, tokenizer, task_type)
    return Prepared(task_type, tokenizer, sources, eval_sets, teacher, shared_vocab, device, report, config.student,
                    other_tokenizer, teacher_processes=teacher_processes)


def saved_student_init(config: PipelineConfig, prep: Prepared, run_dir: Path, processes) -> StudentSettings:
    """A student built from the teacher's layers is saved once to RUN_DIR/student_init and loaded from there: its
    LoRA adapters then name that folder as their base (not the teacher it was cut from), so later stages, best/,
    final/ and `lmdistill eval` reload the student at its own size. Other students load as configured."""
    if config.student.from_teacher is None:
        return config.student
    folder = run_dir / STUDENT_INIT_DIR

    def write():
        if prep.teacher is None and not (folder / "config.json").exists():
            raise ConfigError("student.from_teacher builds the student from the teacher; set teacher.name")
        build_student_init(prep.teacher, config.student.from_teacher, prep.tokenizer, folder)

    main_writes(processes, write)
    return config.student.model_copy(update={"name": str(folder.resolve()), "from_teacher": None})
