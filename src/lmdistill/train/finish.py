"""After (and before) the stages: evaluate the roles, export final/, write the report."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import yaml

from lmdistill.config import EvaluationSettings, GenerationSettings, PipelineConfig
from lmdistill.eval.evaluate import (ANSWER, CONTINUATION, continuation_prompts, evaluate_models,
                                     prompts_and_references, read_metrics, write_metrics)
from lmdistill.eval.report import write_report
from lmdistill.export import export_student
from lmdistill.models.sharding import release_gathered

log = logging.getLogger(__name__)


def generation_prompts(config: PipelineConfig | None, eval_sets: dict[str, list[dict]], tokenizer,
                       task_type: str) -> tuple[list[list[int]], list[str], list[str]]:
    """(prompts, references, modes) from the eval sets, capped at evaluation.max_prompts: prompt/response rows give
    their prompt and answer (ANSWER); plain-text rows the first part of the text (generation.text_prompt_fraction
    or text_prompt_tokens) and its held-out rest (CONTINUATION). Without a config, the settings' defaults."""
    generation = config.generation if config else GenerationSettings()
    max_prompts = (config.evaluation if config else EvaluationSettings()).max_prompts
    prompts, refs, modes = [], [], []
    for examples in eval_sets.values():
        answers = prompts_and_references(examples, tokenizer, encoder_decoder=task_type == "seq2seq",
                                         limit=max_prompts - len(prompts))
        continuations = ([], []) if task_type == "seq2seq" else continuation_prompts(
            examples, tokenizer, generation.text_prompt_fraction, generation.text_prompt_tokens,
            limit=max_prompts - len(prompts) - len(answers[0]))
        for mode, (p, r) in ((ANSWER, answers), (CONTINUATION, continuations)):
            prompts, refs, modes = prompts + p, refs + r, modes + [mode] * len(p)
    return prompts, refs, modes


def evaluate_roles(config: PipelineConfig, run_dir: Path, models: dict[str, torch.nn.Module], tokenizer,
                   eval_sets: dict[str, list[dict]], teacher, task_type: str, model_dirs: dict | None = None,
                   write: bool = True) -> dict:
    """Score models on the eval sets and (write=True) merge the numbers into RUN_DIR/metrics.json."""
    if not eval_sets:
        return {}
    prompts, refs, modes = generation_prompts(config, eval_sets, tokenizer, task_type)
    metrics = evaluate_models(models, tokenizer, eval_sets, teacher=teacher, generation_prompts=prompts or None,
                              references=refs or None, modes=modes, model_dirs=model_dirs,
                              measure_speed=config.evaluation.measure_speed,
                              batch_size=config.training.eval_batch_size,
                              max_new_tokens=config.generation.max_new_tokens)
    release_gathered(teacher)  # a sharded teacher back to its shards before training goes on
    if write:
        write_metrics(run_dir, metrics)
    return metrics


def export_final(config: PipelineConfig, run_dir: Path, model, tokenizer) -> Path:
    merge = config.student.lora is None or config.student.lora.merge_on_save
    card = {
        "name": f"{run_dir.name} (distilled with lmdistill)",
        "teacher": config.teacher.name or "-",
        "student": config.student.name or f"layers of the teacher: {config.student.from_teacher}",
        "data": [f"{name}: {src.path}" for name, src in config.data.sources.items()],
        "stages": [{"name": s.name, "kind": s.kind, "temperature": s.temperature,
                    "losses": ", ".join(f"{t.name}={t.weight}" for t in s.losses)} for s in config.stages],
        "metrics": read_metrics(run_dir),
    }
    config_yaml = yaml.safe_dump(config.model_dump(mode="json", exclude_none=True), sort_keys=False)
    return export_student(model, tokenizer, run_dir / "final", config_yaml, card_info=card, merge_lora=merge)


def report(run_dir: Path) -> Path:
    path = write_report(run_dir)
    log.info("report: %s", path)
    return path
