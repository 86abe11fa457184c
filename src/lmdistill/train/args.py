"""From a pipeline config and one stage to transformers.TrainingArguments: everything Trainer already does stays
Trainer's (accumulation, precision, optimizers, schedules, clipping, checkpoints, logging backends)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from transformers import TrainingArguments

from lmdistill.config import PipelineConfig, StageSettings
from lmdistill.errors import ConfigError

# transformers 5.x renamed gradient_checkpointing to activation_checkpointing; the old name warns on every stage.
_CHECKPOINTING = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
                  else "gradient_checkpointing")

log = logging.getLogger(__name__)

_OPTIMIZERS = {"adamw": "adamw_torch", "sgd": "sgd", "adafactor": "adafactor"}


def check_reporting(config: PipelineConfig) -> None:
    if "wandb" in config.training.report_to:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("--use_wandb / report_to: wandb needs the wandb package: pip install 'lmdistill[wandb]' "
                              "(set WANDB_MODE=offline to log without an account)") from None


def check_precision(config: PipelineConfig) -> None:
    if config.training.fp16 and (config.training.no_cuda or not torch.cuda.is_available()):
        raise ConfigError("--fp16 needs a CUDA GPU, and none is available here; drop --fp16 or use --bf16 "
                          "(bf16 runs on CPU)")
    on_gpu = not config.training.no_cuda and torch.cuda.is_available()
    if config.training.bf16 and on_gpu and not torch.cuda.is_bf16_supported():
        raise ConfigError("--bf16 / training.bf16: this GPU has no bfloat16 (pre-Ampere, e.g. V100 or T4); set "
                          "bf16: false (float32), or fp16: true for mixed precision")
    if config.student.dtype in ("bfloat16", "float16") and config.student.lora is None:
        log.warning("student.dtype %s: the optimizer updates the weights in %s, which rounds away steps smaller than "
                    "their resolution (at lr 1e-5 most of them); for float32 master weights set student.dtype: "
                    "float32 and training.bf16: true (mixed precision)", config.student.dtype, config.student.dtype)


def stage_training_arguments(config: PipelineConfig, stage: StageSettings, stage_dir: Path,
                             has_eval: bool, epochs: float = 1.0) -> TrainingArguments:
    """epochs: passes over the stage's sources (an eval_strategy "epoch" evaluates at the end of each, see
    train/epochs.py)."""
    t = config.training
    eval_steps = stage.eval_steps
    save_steps = stage.save_steps or t.save_every
    kwargs = dict(
        output_dir=str(stage_dir),
        learning_rate=config.stage_value(stage, "learning_rate"),
        per_device_train_batch_size=config.stage_value(stage, "batch_size"),
        per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=config.stage_value(stage, "gradient_accumulation_steps"),
        optim=_OPTIMIZERS[t.optimizer],
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a share of the total steps
        max_grad_norm=t.clip_grad_norm,
        fp16=t.fp16,
        bf16=t.bf16,
        use_cpu=t.no_cuda or not torch.cuda.is_available(),
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        save_total_limit=t.save_total_limit,
        report_to=list(t.report_to) or "none",
        # Mixture datasets are drawn in schedule order: reading them in sequence keeps the schedule, and resume then
        # reproduces the same batches.
        train_sampling_strategy="sequential",
        remove_unused_columns=False,
        prediction_loss_only=True,
        dataloader_num_workers=t.dataloader_num_workers,
        # Every student parameter takes part in every step; DDP need not search the graph for unused ones.
        ddp_find_unused_parameters=False,
        # Non-reentrant checkpointing also works when the inputs need no gradient (frozen embeddings under LoRA).
        **{_CHECKPOINTING: t.gradient_checkpointing,
           f"{_CHECKPOINTING}_kwargs": {"use_reentrant": False} if t.gradient_checkpointing else None},
        torch_compile=t.torch_compile,
    )
    if t.dataloader_num_workers and stage.eval_driven_sampling is not None and stage.eval_driven_sampling.enabled:
        raise ConfigError(f"stages[{stage.name}]: evaluation-driven sampling reweighs the sources in the training "
                          "process, which loader workers never see; set training.dataloader_num_workers: 0")
    if t.deepspeed:
        kwargs["deepspeed"] = _deepspeed_file(t.deepspeed)
    if stage.max_steps:
        kwargs["max_steps"] = stage.max_steps
    else:
        # The mixture dataset already holds `epochs` passes over the sources (stage_draws): one pass over it.
        kwargs["num_train_epochs"] = 1
    if save_steps:
        kwargs.update(save_strategy="steps", save_steps=save_steps)
    else:
        kwargs.update(save_strategy="epoch")
    if has_eval:
        strategy = "steps" if eval_steps or save_steps else "epoch"
        # Trainer tracks (and protects from rotation) the best checkpoint; the pipeline copies it to best/ and saves the
        # last weights as final/, so the model is not swapped for the best one at the end of training.
        kwargs.update(eval_strategy=strategy, metric_for_best_model=stage.metric_for_best,
                      greater_is_better=not stage.metric_for_best.endswith("loss"))
        if strategy == "steps":
            # Trainer requires save steps to be a multiple of eval steps when it keeps the best model.
            eval_steps = eval_steps or save_steps
            kwargs.update(eval_steps=eval_steps, save_strategy="steps", save_steps=save_steps or eval_steps)
            if kwargs["save_steps"] % eval_steps:
                raise ConfigError(f"stages[{stage.name}]: save_steps ({kwargs['save_steps']}) must be a multiple of "
                                  f"eval_steps ({eval_steps}) so the best checkpoint can be kept")
    if t.patience:
        if kwargs.get("eval_strategy") != "steps" and not (kwargs.get("eval_strategy") == "epoch" and epochs > 1):
            raise ConfigError(f"stages[{stage.name}]: training.patience stops a stage on its evaluations, but it is "
                              f"evaluated {'only once, at its end' if has_eval else 'never (no data.eval)'}; set "
                              "eval_steps on the stage" + ("" if has_eval else " and give data.eval"))
        # The early-stopping counter travels with the checkpoints, so a resumed stage stops where it would have.
        kwargs["restore_callback_states_from_checkpoint"] = True
    clash = sorted(set(t.extra_args) & set(kwargs))
    if clash:
        raise ConfigError(f"training.extra_args.{clash[0]}: lmdistill sets this TrainingArguments field from its own "
                          "keys (training.*, the stage's settings); set it there")
    return TrainingArguments(**kwargs, **t.extra_args)


def early_stopping(config: PipelineConfig) -> list:
    """transformers' EarlyStoppingCallback on the stage's metric_for_best, when training.patience asks for it."""
    if not config.training.patience:
        return []
    from transformers import EarlyStoppingCallback

    return [EarlyStoppingCallback(early_stopping_patience=config.training.patience)]


def _deepspeed_file(path: str) -> str:
    if not Path(path).is_file():
        raise ConfigError(f"training.deepspeed: no file at {path}; give the path of a DeepSpeed JSON config")
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("training.deepspeed needs the deepspeed package: pip install deepspeed")
    return path
