"""A frozen teacher split over the launched processes, so that each holds 1/W of its weights.

Trainer prepares only its `model`, and accelerate's `prepare_model(..., evaluation_mode=True)` does not shard an eval
model, so the teacher would be a whole copy per process. Under FSDP (or when asked) the teacher is instead loaded
with transformers' own FSDP2 (`from_pretrained(distributed_config=DistributedConfig(fsdp_size=W))`): each process
reads only its shard from disk, and a forward pass gathers one decoder layer at a time (the model's `_fsdp_plan`;
a model without one gathers the whole teacher per forward, which still keeps it sharded between steps).

The forward passes of a sharded teacher are collective: every process must run the same number of them, in the same
order. Training steps and Trainer's evaluation do (even batches on every process); what runs on the main process
alone elsewhere in the pipeline runs on every process instead when the teacher is sharded (see `is_sharded`).
Generation stays in step by itself: transformers turns on `synced_gpus` for an FSDP-managed model.
"""

from __future__ import annotations

import os
from typing import Literal

from torch import nn

ShardSetting = Literal["auto", "always", "never"]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def teacher_shard_size(setting: ShardSetting, world_size: int) -> int:
    """How many processes the teacher is loaded over with FSDP2 (1: a whole copy per process).

    auto: sharded when the launch shards the student with FSDP (accelerate sets ACCELERATE_USE_FSDP); always:
    sharded whenever several processes run, also next to a DDP student. Under DeepSpeed the teacher is loaded whole
    and handed to a ZeRO-3 engine by the trainer instead (FSDP2 and DeepSpeed do not share parameters).
    """
    if setting == "never" or world_size < 2 or _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return 1
    if setting == "always" or _env_flag("ACCELERATE_USE_FSDP"):
        return world_size
    return 1


def is_sharded(model: nn.Module | None) -> bool:
    """True for a model whose parameters are split over processes (FSDP 1 or 2, by transformers or accelerate, or a
    DeepSpeed ZeRO-3 partition), or that runs one (several teachers, one of them sharded by its own `shard`
    setting): its forward passes must run on every process together."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if not isinstance(model, nn.Module):
        return False
    fsdp = (FSDPModule, FullyShardedDataParallel)
    if any(isinstance(m, fsdp) or getattr(m, "_is_fsdp_managed_module", False) for m in model.modules()):
        return True
    return any(hasattr(p, "ds_id") for p in model.parameters())


def local_parameter_count(model: nn.Module) -> tuple[int, int]:
    """(elements this process holds, elements of the whole model)."""
    local = total = 0
    for p in model.parameters():
        total += p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        if hasattr(p, "to_local"):  # DTensor (FSDP2)
            local += p.to_local().numel()
        elif hasattr(p, "ds_tensor"):  # DeepSpeed ZeRO-3 partition
            local += p.ds_tensor.numel()
        else:
            local += p.numel()
    return local, total


def release_gathered(model: nn.Module | None) -> None:
    """Free the whole weights an FSDP2 forward left gathered. FSDP2 keeps the root's group (and modules planned
    `keep_full_weight`, such as the lm_head) whole after a forward, for a backward pass; a frozen teacher never runs
    one, so without this its root would stay whole on every process. Local: no communication; nothing to do for a
    model that is not sharded (or None)."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, nn.Module):
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
