"""Which teacher and which student each stage trains with, and which teachers stay in memory.

    run's teacher(s)           teacher: / teachers: (several: a TeacherEnsemble, mixture or routing)
    teacher: {from_stage: s}   stage s's best student (as pipeline_state.json records it), frozen
    teacher: {self: ema}       a moving average of the student itself (train/ema.py)
    student: {from_teacher}    a new student cut from this stage's teacher by layer dropping, saved once to
                               RUN_DIR/<stage>/student_init and loaded from there (so it reloads at its own size)

Teachers beyond the run's first are loaded by the first stage that needs them and kept for later stages; a stage
teacher that no later stage names is released. Each stage logs the teachers resident and their dtype.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from torch import nn

from lmdistill.config import FromTeacher, PipelineConfig, StageSettings, StudentSettings, TeacherEntry
from lmdistill.data.mixture import ID_STRIDE
from lmdistill.errors import ConfigError
from lmdistill.models.load import freeze, frozen_teacher, load_student, load_tokenizer, resolve_device
from lmdistill.models.student_init import student_from_teacher
from lmdistill.models.vocab import check_same_vocab
from lmdistill.teacher.ensemble import TeacherEnsemble
from lmdistill.train.state import PipelineState, replace_dir_atomic

log = logging.getLogger(__name__)

STUDENT_INIT_DIR = "student_init"


class TeacherPool:
    """Teachers besides the run's first, by key, loaded on first use."""

    def __init__(self) -> None:
        self.models: dict[str, nn.Module] = {}

    def get(self, key: str, load: Callable[[], nn.Module]) -> nn.Module:
        if key not in self.models:
            self.models[key] = load()
        return self.models[key]

    def keep(self, keys: set[str]) -> None:
        for key in [k for k in self.models if k not in keys]:
            del self.models[key]


def build_student_init(teacher: nn.Module, spec: FromTeacher, tokenizer, folder: Path) -> None:
    """The student cut from `teacher`, saved to `folder` once (an earlier run's is kept: checkpoints refer to it)."""
    if (folder / "config.json").exists():
        return
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    student_from_teacher(teacher, spec).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    replace_dir_atomic(tmp, folder)


def stage_teacher(config: PipelineConfig, prep, stage: StageSettings, run_dir: Path) -> nn.Module | None:
    """The frozen teacher `stage` distils from (None: a finetune stage, or an EMA teacher made from the student)."""
    spec = stage.teacher
    needed = _pool_keys(config, [stage])
    if later := config.stages[config.stages.index(stage) + 1:]:
        needed |= _pool_keys(config, later) & set(prep.pool.models)  # kept for later stages, not loaded for them
    prep.pool.keep(needed)
    if stage.kind == "finetune" or (spec is not None and spec.self_ is not None):
        return None
    if spec is not None:
        return prep.pool.get(f"stage {spec.from_stage}", lambda: _stage_student(config, prep, spec.from_stage, run_dir))
    if not config.teachers or len(config.teachers) == 1:
        return prep.teacher
    if stage.teacher_source == "cache":
        return None  # the cache holds the teachers' mixture (and routed teachers) already: none is loaded
    return run_teachers(config, prep, stage.temperature)


def run_teachers(config: PipelineConfig, prep, temperature: float) -> TeacherEnsemble:
    """The run's several teachers as one module: their mixture at `temperature`, or per source its routed teacher.
    The teachers beyond the first are loaded on first use and kept in the pool."""
    others = [prep.pool.get(f"teacher {i}", lambda e=entry: _extra_teacher(config, prep, e))
              for i, entry in enumerate(config.teachers[1:], start=1)]
    routes = {source: i for i, entry in enumerate(config.teachers) for source in entry.sources or []}
    return TeacherEnsemble([prep.teacher, *others], [e.weight for e in config.teachers], routes, temperature)


def teacher_shard_settings(config: PipelineConfig, teacher: nn.Module | None) -> list[str]:
    """The `shard` setting of each of the stage's teachers, in order: with several, each entry's own; else the run
    teacher's (which an earlier stage's student run as a teacher follows too)."""
    if isinstance(teacher, TeacherEnsemble):
        return [entry.shard for entry in config.teachers]
    return [config.teacher.shard]


def route_sources(teacher: nn.Module | None, source_names: list[str], eval_sets: dict[str, list[dict]],
                  eval_examples: list[dict]) -> list[dict]:
    """Tell an ensemble how the stage's dataset numbers its sources (routing reads example ids). With routing, the
    eval examples get ids in the same space, so an eval set held out of (or named like) a routed source is scored
    against that source's teacher, as in training; other sets get ids past the sources (the mixture)."""
    if not isinstance(teacher, TeacherEnsemble):
        return eval_examples
    teacher.use_source_order(source_names)
    if not teacher.routes:
        return eval_examples
    index = {name: i for i, name in enumerate(source_names)}
    return [{**ex, "example_id": index.get(name, len(source_names) + j) * ID_STRIDE + ex.get("row_id", k)}
            for j, (name, rows) in enumerate(eval_sets.items()) for k, ex in enumerate(rows)]


def stage_student(prep, stage: StageSettings, teacher: nn.Module | None, run_dir: Path, start_from: str | None,
                  main_writes: Callable[[Callable[[], object]], None]) -> tuple[StudentSettings, str | None]:
    """(how to load the stage's student, the checkpoint it starts from): the previous stage's student, or one cut
    from this stage's teacher (`student: {from_teacher}`)."""
    if stage.student is None:
        return prep.student, start_from
    source = teacher.teachers[0] if isinstance(teacher, TeacherEnsemble) else teacher
    if source is None:
        raise ConfigError(f"stage {stage.name!r} cuts its student from its teacher, but it has none; set a teacher")
    folder = run_dir / stage.name / STUDENT_INIT_DIR
    main_writes(lambda: build_student_init(source, stage.student.from_teacher, prep.tokenizer, folder))
    return prep.student.model_copy(update={"name": str(folder.resolve()), "from_teacher": None}), None


def log_resident(stage: StageSettings, prep, teacher: nn.Module | None, ema: bool) -> None:
    """One line per stage: the teachers in memory and their dtype, and which one this stage runs."""
    resident = [("run teacher", prep.teacher)] if prep.teacher is not None else []
    resident += list(prep.pool.models.items())
    parts = [f"{key} ({_dtype(model)})" for key, model in resident]
    used = ("an EMA of the student" if ema else "the teacher cache" if stage.teacher_source == "cache"
            else "none" if teacher is None
            else "a mixture/routing of several teachers" if isinstance(teacher, TeacherEnsemble)
            else next((key for key, model in resident if model is teacher), "the run teacher"))
    log.info("stage %s: teachers resident: %s; this stage distils from %s", stage.name, ", ".join(parts) or "none",
             used)


def _dtype(model: nn.Module) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def _pool_keys(config: PipelineConfig, stages: list[StageSettings]) -> set[str]:
    keys = set()
    for stage in stages:
        if stage.kind == "finetune":
            continue
        if stage.teacher is not None:
            if stage.teacher.from_stage is not None:
                keys.add(f"stage {stage.teacher.from_stage}")
        elif config.teachers and len(config.teachers) > 1 and stage.teacher_source != "cache":
            keys |= {f"teacher {i}" for i in range(1, len(config.teachers))}
    return keys


def _stage_student(config: PipelineConfig, prep, name: str, run_dir: Path) -> nn.Module:
    rec = next((r for r in PipelineState.load(run_dir).stages if r.name == name and r.status == "done"), None)
    path = rec and (rec.best_path if rec.best_path and Path(rec.best_path).exists() else rec.final_path)
    if not path or not Path(path).exists():
        raise ConfigError(f"a stage takes its teacher from stage {name!r}, which has not finished in {run_dir}: run "
                          "that stage first (drop --start_stage)")
    model = load_student(prep.student, prep.task_type, device=prep.device, teacher=None, checkpoint=path)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()  # an adapter student: the teacher runs its merged weights
    log.info("stage %s's student (%s) is loaded as a teacher", name, path)
    return freeze(model)


def _extra_teacher(config: PipelineConfig, prep, entry: TeacherEntry) -> nn.Module:
    device = resolve_device(entry.device, no_cuda=config.training.no_cuda)
    model = frozen_teacher(entry, prep.task_type, device=device, processes=prep.teacher_processes)
    rows = model.get_output_embeddings().weight.shape[0]
    first_rows = prep.teacher.get_output_embeddings().weight.shape[0]
    check_same_vocab(load_tokenizer(entry.name, entry.trust_remote_code), prep.tokenizer, rows, first_rows,
                     needed_by="several teachers (their distributions are mixed token by token)")
    log.info("teacher %s loaded (%s)", entry.name, _dtype(model))
    return model
