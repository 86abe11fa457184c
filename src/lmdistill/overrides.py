"""Seed-style command-line flags applied to a raw config dict (validation happens after, on the result)."""

from __future__ import annotations

import json
from typing import Any

from lmdistill.errors import ConfigError

# Seed flags -> where they land. "stages.*" sets the key on every stage; "training.*" on the shared defaults.
FLAG_TARGETS: dict[str, str] = {
    "teacher_model": "teacher.name",
    "student_model": "student.name",
    "output_dir": "output_dir",
    "general_dataset": "data.sources.general.path",
    "domain_dataset": "data.sources.domain.path",
    "general_csv_path": "data.sources.general.path",
    "medical_csv_path": "data.sources.domain.path",
    "eval_csv_path": "data.eval.eval.path",
    "task_type": "task_type",
    "max_length": "data.max_length",
    "batch_size": "stages.batch_size",
    "gradient_accumulation_steps": "stages.gradient_accumulation_steps",
    "learning_rate": "stages.learning_rate",
    "epochs": "stages.epochs",
    "temperature": "stages.temperature",
    "vocab_chunk_size": "stages.chunk_size",
    "optimizer": "training.optimizer",
    "weight_decay": "training.weight_decay",
    "warmup_ratio": "training.warmup_ratio",
    "lr_scheduler_type": "training.lr_scheduler_type",
    "clip_grad_norm": "training.clip_grad_norm",
    "seed": "training.seed",
    "fp16": "training.fp16",
    "bf16": "training.bf16",
    "no_cuda": "training.no_cuda",
    "save_every": "training.save_every",
    "log_interval": "training.logging_steps",
    "strict": "data.strict",
}


def apply_overrides(data: dict, flags: dict[str, Any]) -> dict:
    """Apply seed-style flags (None = not given) to a raw config dict; validation happens after, on the result."""
    data = json.loads(json.dumps(data))  # deep copy; the caller's dict stays as read
    given = {k: v for k, v in flags.items() if v is not None and v is not False}
    for flag, value in given.items():
        if flag in FLAG_TARGETS:
            _set_path(data, FLAG_TARGETS[flag], value)
        elif flag == "dataset":
            sources = data.setdefault("data", {}).setdefault("sources", {})
            if len(sources) > 1:
                raise ConfigError(f"--dataset sets a single training source, but the config has {sorted(sources)}; "
                                  "use --general_dataset / --domain_dataset instead")
            name = next(iter(sources), "train")
            sources.setdefault(name, {})["path"] = value
        elif flag == "num_samples":
            for group in ("sources", "eval"):
                for src in data.get("data", {}).get(group, {}).values():
                    src["max_rows"] = value
        elif flag == "use_lora":
            data.setdefault("student", {}).setdefault("lora", {})
        elif flag == "use_wandb":
            report = data.setdefault("training", {}).setdefault("report_to", ["tensorboard"])
            if "wandb" not in report:
                report.append("wandb")
        else:
            raise ConfigError(f"unknown override --{flag}")
    if "epochs" in given:
        for stage in data.get("stages", []):
            stage.pop("max_steps", None)  # --epochs means epochs: a preset's max_steps would otherwise win
    if "student_model" in given:
        data["student"].pop("from_teacher", None)
    return data


def _set_path(data: dict, path: str, value: Any) -> None:
    head, _, rest = path.partition(".")
    if head == "stages":
        stages = data.get("stages") or []
        if not stages:
            raise ConfigError(f"--{rest} applies to every stage, but the config has no stages")
        for stage in stages:
            stage[rest] = value
        return
    node = data
    keys = path.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
