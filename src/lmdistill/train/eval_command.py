"""`lmdistill eval`: score a run's final student and its teacher as the run did (the run's teacher settings, eval
sets, row caps, generation length and batch size), or any model on given data files."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from lmdistill.config import CONFIG_FILE, PipelineConfig, SourceSettings, config_from_dict, load_config
from lmdistill.errors import ConfigError, ModelError
from lmdistill.eval.evaluate import METRICS_FILE, write_metrics
from lmdistill.models.load import detect_task_type, freeze, load_model, load_student, load_tokenizer, resolve_device
from lmdistill.models.vocab import same_vocab
from lmdistill.train.finish import evaluate_roles
from lmdistill.train.prepare import load_data, student_trusts_remote_code

log = logging.getLogger(__name__)

EVAL_FILE = "eval_metrics.json"  # beside the run's own metrics.json, which `lmdistill eval` leaves as the run wrote it


@dataclass
class EvalResult:
    metrics: dict[str, dict[str, float]]
    rows: dict[str, int]  # eval set -> rows scored
    row_cap: int | None  # the cap that applied to each eval set (None: every row)
    written: Path | None


def _settings(target: Path, data_paths: list[str], max_length: int | None, max_new_tokens: int | None,
              max_rows: int | None) -> tuple[PipelineConfig, str | None]:
    """The config to evaluate with: the run's (a run directory), else the defaults; flags given override it.
    Returns (config, run's final student folder or None)."""
    if (target / CONFIG_FILE).exists():
        final = target / "final"
        if not final.exists():
            raise ModelError(f"{target} has no final/ student yet: finish `lmdistill run` first, or evaluate a "
                             "stage's best/ folder with --data")
        config, model = load_config(target / CONFIG_FILE), str(final)
    else:
        if not data_paths:
            raise ConfigError(f"{target} is not a run directory (no {CONFIG_FILE}): pass --data FILE to evaluate it on")
        config, model = config_from_dict({"stages": [{"name": "eval"}]}, source="defaults"), None
    data = config.data
    if data_paths:
        data = data.model_copy(update={"eval": {Path(p).stem: SourceSettings(path=p) for p in data_paths},
                                       "eval_max_rows": max_rows})
    elif max_rows is not None:
        data = data.model_copy(update={"eval_max_rows": max_rows})
    if max_length is not None:
        data = data.model_copy(update={"max_length": max_length})
    generation = config.generation
    if max_new_tokens is not None:
        generation = generation.model_copy(update={"max_new_tokens": max_new_tokens})
    return config.model_copy(update={"data": data, "generation": generation}), model


def evaluate_target(target: str, teacher_name: str | None = None, data_paths: list[str] = (), *,
                    max_length: int | None = None, max_new_tokens: int | None = None, max_rows: int | None = None,
                    merge: bool = False, out: Path | None = None) -> EvalResult:
    """A run directory: its final/ student and its teacher (loaded as the run loaded it), on its eval sets (or its
    held-out rows), written to RUN_DIR/eval_metrics.json, or merged into metrics.json with `merge`. A model folder
    or hub name: scored on `data_paths`, written only to `out`."""
    path = Path(target)
    config, final = _settings(path, list(data_paths), max_length, max_new_tokens, max_rows)
    run_dir = path if final else None
    model_dir = final or target
    trust = student_trusts_remote_code(config)
    task_type = config.task_type if config.task_type != "auto" else detect_task_type(model_dir, trust)
    tokenizer = load_tokenizer(model_dir, trust)
    _, eval_sets, _ = load_data(config, tokenizer, task_type, eval_only=True)
    if not eval_sets:
        raise ConfigError(f"nothing to evaluate on in {target}: pass --data FILE")
    device = resolve_device("auto", no_cuda=config.training.no_cuda)
    role = "student_after" if run_dir else "model"
    settings = config.student if run_dir else config.student.model_copy(update={"name": model_dir})
    models = {role: load_student(settings, task_type, device=device, teacher=None, checkpoint=final)}
    teacher = None
    teacher_settings = config.teacher.model_copy(update={"name": teacher_name}) if teacher_name else config.teacher
    if teacher_settings.name:
        if same_vocab(load_tokenizer(teacher_settings.name, teacher_settings.trust_remote_code), tokenizer):
            teacher = freeze(load_model(teacher_settings, task_type, device=resolve_device(
                teacher_settings.device, no_cuda=config.training.no_cuda)))
            models["teacher"] = teacher
        else:
            log.warning("the teacher %s has another vocabulary: it cannot score the student's tokens, so it is left "
                        "out", teacher_settings.name)
    metrics = evaluate_roles(config, run_dir or Path("."), models, tokenizer, eval_sets, teacher, task_type,
                             model_dirs={role: model_dir, "teacher": teacher_settings.name}, write=False)
    written = out or (run_dir / (METRICS_FILE if merge else EVAL_FILE) if run_dir else None)
    if written is not None:
        write_metrics(written.parent, metrics, merge=merge, file_name=written.name)
    return EvalResult(metrics, {name: len(rows) for name, rows in eval_sets.items()}, config.data.eval_max_rows,
                      written)
