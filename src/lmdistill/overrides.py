"""Command-line flags applied to a raw config dict (validation happens after, on the result).

The flags are spelled as in run_distillation.py (--general_dataset, --domain_dataset, --start_stage, ...) and
llm_kd.py (--dataset, --task_type, --epochs, ...). Without a config file they alone describe the run: the data flags
choose the preset and replace its data entirely, so no source or eval file the user did not name is trained on.
"""

from __future__ import annotations

import json
from typing import Any

from lmdistill.errors import ConfigError

# Flags -> where they land. "stages.*" sets the key on every stage; "training.*" on the shared defaults.
FLAG_TARGETS: dict[str, str] = {
    "teacher_model": "teacher.name",
    "teacher_endpoint": "teacher.endpoint",
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


_SOURCE_FLAGS = {flag: target.split(".")[2] for flag, target in FLAG_TARGETS.items()
                 if target.startswith("data.sources.")}
_TWO_SOURCES = "--general_dataset and --domain_dataset (alias --finance_dataset, --medical_dataset)"


def _given(flags: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in flags.items() if v is not None and v is not False}


def preset_for_flags(flags: dict[str, Any]) -> str:
    """Without a config file, the preset the data flags describe: general and domain data are the three stages of
    run_distillation.py (`multistage`), --dataset the single KD stage of llm_kd.py (`simple`)."""
    given = _given(flags)
    named = sorted({_SOURCE_FLAGS[f] for f in given if f in _SOURCE_FLAGS})
    if "dataset" in given and named:
        raise ConfigError(f"--dataset trains one stage on one source; {_TWO_SOURCES} train three stages: "
                          "give one or the other")
    if "dataset" in given:
        return "simple"
    if named == ["domain", "general"]:
        return "multistage"
    if named:
        raise ConfigError(f"the three stages need both {_TWO_SOURCES}; only the {named[0]} data was given "
                          "(for one stage on one dataset use --dataset)")
    raise ConfigError("no training data: without a config file pass --dataset DATA (one distillation stage) or "
                      f"{_TWO_SOURCES} (three stages), or write a config with `lmdistill init`")


def flags_only_config(preset: dict, flags: dict[str, Any]) -> dict:
    """A preset with its models and data taken out: the flags must name them (no hub model or dataset, no eval
    file the user did not ask for is used). Apply `apply_overrides` to the result."""
    given = _given(flags)
    missing = [f"--{f}" for f in ("teacher_model", "student_model") if f not in given]
    if missing:
        raise ConfigError(f"without a config file name the models: {' and '.join(missing)} (a hub name or a "
                          "local folder), or write a config with `lmdistill init`")
    data = json.loads(json.dumps(preset))
    data["data"]["sources"], data["data"]["eval"] = {}, {}
    return data


def apply_overrides(data: dict, flags: dict[str, Any]) -> dict:
    """Apply the flags (None = not given) to a raw config dict; validation happens after, on the result."""
    data = json.loads(json.dumps(data))  # deep copy; the caller's dict stays as read
    given = _given(flags)
    sources = data.get("data", {}).get("sources") or {}
    for flag, value in given.items():
        if flag in _SOURCE_FLAGS and sources and _SOURCE_FLAGS[flag] not in sources:
            # An extra source would join every stage without a mixture of its own, next to the config's sources.
            raise ConfigError(f"--{flag} sets the source {_SOURCE_FLAGS[flag]!r}, but the config's sources are "
                              f"{sorted(sources)}; use --dataset for a single source, or add "
                              f"{_SOURCE_FLAGS[flag]!r} to data.sources")
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
