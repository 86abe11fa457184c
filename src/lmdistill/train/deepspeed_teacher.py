"""The frozen teacher under DeepSpeed ZeRO-3: an inference-only engine whose parameters are partitioned over the
processes, next to a student that Trainer (through accelerate) trains with ZeRO-3.

Trainer hands DeepSpeed only its `model`; the teacher would otherwise stay a whole copy on every process. Here the
teacher gets its own engine, built from the student's DeepSpeed config (the one accelerate holds) with everything
that only training needs taken out. This follows accelerate's "multiple models with DeepSpeed" guide and TRL's
`prepare_deepspeed` for reference models, with three differences: the optimizer-side sections are dropped rather
than carried along unused, the hidden-size knobs are sized for the teacher, and the result has no "auto" left.
DeepSpeed (0.19.8, checked) fails on "auto" in train_micro_batch_size_per_gpu (a TypeError in its batch check),
silently reads fp16/bf16 "enabled": "auto" as false, and replaces "auto" inside zero_optimization by its defaults.

Forward passes of a ZeRO-3 teacher are collective (each layer's weights are all-gathered when it runs): every
process must run the same number of teacher forwards, in the same order.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from torch import nn

from lmdistill.errors import TrainingError
from lmdistill.models.sharding import is_sharded

# zero_optimization keys that matter to a model that is only ever run forward: where its parameters live and how
# they are fetched. Everything else there (gradient buckets, reduce-scatter, optimizer offload, sub-groups, saving
# gathered weights) concerns gradients or the optimizer. DeepSpeed accepts both spellings of the stage-3 knobs.
_INFERENCE_ZERO_KEYS = frozenset({
    "stage", "offload_param", "overlap_comm",
    "stage3_prefetch_bucket_size", "prefetch_bucket_size",
    "stage3_param_persistence_threshold", "param_persistence_threshold",
    "stage3_model_persistence_threshold", "model_persistence_threshold",
    "stage3_max_live_parameters", "max_live_parameters",
    "stage3_max_reuse_distance", "max_reuse_distance",
    "stage3_module_granularity_threshold", "stage3_use_all_reduce_for_fetch_params", "stage3_allgather_sequential",
    "zero_hpz_partition_size", "zero_quantized_weights", "zero_quantized_nontrainable_weights", "leaf_module",
})

# Knobs that transformers sizes from the model's hidden size when they are "auto" (HfTrainerDeepSpeedConfig.
# trainer_config_finalize, same formulas); resolved here from the TEACHER's width, since the student's would be
# sized for a smaller model.
_HIDDEN_SIZE_KNOBS = {
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value == "auto"


def _drop_auto(section: dict) -> dict:
    """`section` without its "auto" values, recursively (DeepSpeed then applies its own defaults for them)."""
    return {key: _drop_auto(value) if isinstance(value, dict) else value
            for key, value in section.items() if not _is_auto(value)}


def _student_stage(student_ds_config: dict) -> int:
    if not isinstance(student_ds_config, dict):
        raise TrainingError(f"the student's DeepSpeed config must be a dict (accelerator.state.deepspeed_plugin."
                            f"deepspeed_config), got {type(student_ds_config).__name__}")
    zero = student_ds_config.get("zero_optimization")
    if not isinstance(zero, dict) or "stage" not in zero:
        raise TrainingError("the student's DeepSpeed config has no zero_optimization.stage, so it cannot say whether "
                            "the teacher should be partitioned; set zero_optimization: {stage: 3} in the DeepSpeed "
                            "config (or zero_stage: 3 in the accelerate config)")
    stage = zero["stage"]
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage <= 3:
        raise TrainingError(f"zero_optimization.stage in the student's DeepSpeed config must be 0, 1, 2 or 3, got "
                            f"{stage!r}")
    return stage


def _precision(student_ds_config: dict) -> dict:
    """The fp16/bf16 sections, copied: DeepSpeed casts the teacher's parameters to the enabled half type."""
    sections = {}
    for name in ("fp16", "bf16"):
        section = student_ds_config.get(name)
        if section is None:
            continue
        if _is_auto(section.get("enabled")):
            # DeepSpeed would silently read "auto" as disabled and keep the teacher in float32.
            raise TrainingError(f"{name}.enabled is still 'auto' in the student's DeepSpeed config: build the teacher "
                                f"engine after Trainer/Accelerator resolved it, or set {name}.enabled to true or false")
        sections[name] = _drop_auto(section)
    return sections


def _batch_size(value: Any) -> int:
    """A per-process batch key: the student's when it is resolved, else 1 (the teacher engine never steps, but
    DeepSpeed checks the batch keys when it builds any engine)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1


def teacher_zero3_config(student_ds_config: dict, *, hidden_size: int | None = None) -> dict | None:
    """The DeepSpeed config of an inference-only ZeRO-3 engine for the teacher, from the student's config.

    Args:
        student_ds_config: the student's DeepSpeed config, as `accelerator.state.deepspeed_plugin.deepspeed_config`
            holds it under Trainer (not modified).
        hidden_size: the teacher's hidden size; "auto" values of stage3_prefetch_bucket_size and
            stage3_param_persistence_threshold are sized from it as transformers would (0.9*h*h and 10*h).
            Without it those "auto" values are dropped and DeepSpeed's defaults apply.

    Returns:
        None when the student is not at ZeRO stage 3: the teacher is then not handed to DeepSpeed at all and stays a
        whole frozen copy per process, as under DDP. A stage-0 engine (what TRL builds for a reference model) would
        only cast and move the teacher, which lmdistill's loader already does with the teacher's own dtype and
        device settings, and it would override that dtype with the student's mixed precision.

        Otherwise a new dict: zero_optimization with stage 3 and the student's parameter-side knobs only (offload_param,
        prefetch bucket, persistence threshold, max live parameters...; no offload_optimizer, no gradient buckets),
        the fp16/bf16 sections copied, no optimizer and no scheduler, and consistent batch keys:
        train_micro_batch_size_per_gpu and gradient_accumulation_steps (the student's, or 1 where "auto"), with
        train_batch_size left out so DeepSpeed derives it as micro * accumulation * world size. No "auto" remains.

    Raises:
        TrainingError: the config has no zero_optimization.stage, a stage outside 0..3, or an fp16/bf16 "enabled"
            still "auto".
    """
    if _student_stage(student_ds_config) != 3:
        return None
    zero = {key: copy.deepcopy(value) for key, value in student_ds_config["zero_optimization"].items()
            if key in _INFERENCE_ZERO_KEYS}
    for key, size in _HIDDEN_SIZE_KNOBS.items():
        if _is_auto(zero.get(key)) and hidden_size is not None:
            zero[key] = size(hidden_size)
    config: dict = {
        "zero_optimization": _drop_auto(zero),
        "train_micro_batch_size_per_gpu": _batch_size(student_ds_config.get("train_micro_batch_size_per_gpu")),
        "gradient_accumulation_steps": _batch_size(student_ds_config.get("gradient_accumulation_steps")),
    }
    config.update(_precision(student_ds_config))
    return config


def _hidden_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    if getattr(config, "hidden_sizes", None):
        return max(config.hidden_sizes)
    text_config = getattr(config, "text_config", None)
    return getattr(config, "hidden_size", None) or getattr(text_config, "hidden_size", None)


def deepspeed_teacher(teacher: nn.Module, accelerator) -> nn.Module:
    """The teacher partitioned by an inference-only DeepSpeed ZeRO-3 engine, when the student trains under ZeRO-3.

    Memory: each of the W processes keeps 1/W of the teacher's parameters (`p.ds_tensor`; parameters under the
    persistence threshold, e.g. norms, stay whole on every process) instead of a whole copy, or none on the
    accelerator with offload_param: cpu/nvme. During a forward pass only the layers being computed are gathered
    (bounded by the prefetch bucket and max live parameters). The cost is an all-gather of the teacher's weights per
    forward pass, and every process must run the same teacher forwards.

    Args:
        teacher: the frozen teacher, loaded whole (or already partitioned by `deepspeed.zero.Init`, which transformers
            uses when it loads a model while a ZeRO-3 TrainingArguments exists).
        accelerator: the Trainer's `accelerate.Accelerator`; its DeepSpeed plugin's config is the student's.

    Returns:
        The engine's module (the teacher itself, with DeepSpeed's partitioning hooks), in eval mode with
        requires_grad off; call it under torch.no_grad(). When the student is not at ZeRO-3 (see
        `teacher_zero3_config`), the teacher unchanged apart from eval mode and requires_grad off.

    Raises:
        TrainingError: deepspeed is not installed, the accelerator is not set up for DeepSpeed, or the student's config
            cannot be turned into a teacher config (see `teacher_zero3_config`).
    """
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    if plugin is None:
        raise TrainingError("deepspeed_teacher needs an accelerator launched with DeepSpeed (accelerate launch "
                            "--config_file examples/accelerate/deepspeed_zero3.yaml); this one has no DeepSpeed plugin")
    config = teacher_zero3_config(plugin.deepspeed_config, hidden_size=_hidden_size(teacher))
    teacher.eval()
    teacher.requires_grad_(False)
    if config is None:
        return teacher
    try:
        import deepspeed  # only DeepSpeed launches reach here; it is not a dependency of lmdistill
    except ImportError as err:
        raise TrainingError("the teacher is to be partitioned with DeepSpeed ZeRO-3, but deepspeed is not installed: "
                            "pip install deepspeed (or launch without the DeepSpeed config)") from err
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    # The parameter-fetching hooks are registered on the module itself, so it runs without the engine wrapper (checked
    # with the engine collected: tests/distributed/test_deepspeed_cpu.py).
    return engine.module.eval()


def deepspeed_teachers(teacher: nn.Module, settings: Sequence[str], accelerator) -> nn.Module:
    """`teacher` with each of its teachers whose `shard` setting is not 'never' partitioned by an engine of its own
    (`deepspeed_teacher`), once per run: later stages share the teachers, already partitioned.

    Args:
        teacher: one frozen teacher, or several (teacher/ensemble.py: its `teachers`, each partitioned or not).
        settings: the `shard` setting of each teacher, in order (one for a single teacher).
        accelerator: as for `deepspeed_teacher`.
    """
    several = hasattr(teacher, "mixed")
    members = teacher.teachers if several else [teacher]
    for i, (member, setting) in enumerate(zip(members, settings, strict=True)):
        if setting != "never" and not is_sharded(member):
            members[i] = deepspeed_teacher(member, accelerator)
    return teacher if several else members[0]
