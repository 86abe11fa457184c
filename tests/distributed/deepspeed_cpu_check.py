"""deepspeed_teacher on CPU processes, for launch under torchrun by test_deepspeed_cpu.py (not a test module).

Each process builds accelerate's DeepSpeed ZeRO-3 setup (the plugin that examples/accelerate/deepspeed_zero3.yaml
gives, "auto" values included), hands two tiny Llama teachers to `deepspeed_teacher` (one float32, one under bf16)
and writes CHECK_DIR/rank{RANK}.json with what it holds and what the teachers computed, next to a whole copy of each.

Accelerate only enables DeepSpeed for a non-CPU device, and with no GPU it picks no process-group backend (it then
says num_processes 1 on every rank); naming the backend (gloo) before the Accelerator is built fixes both. DeepSpeed
itself runs on the CPU with DS_ACCELERATOR=cpu.
"""

from __future__ import annotations

import gc
import json
import math
import os
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DeepSpeedPlugin

from lmdistill.models.tiny import tiny_causal_lm
from lmdistill.train.deepspeed_teacher import deepspeed_teacher

VOCAB, LAYERS, HIDDEN = 256, 2, 64


def _teacher():
    return tiny_causal_lm(VOCAB, num_layers=LAYERS, hidden_size=HIDDEN, seed=3)


def _holdings(model: torch.nn.Module, world: int) -> dict:
    """Elements held here vs. the whole model, and whether every parameter holds exactly its 1/world slice."""
    params = list(model.parameters())
    return {
        "local": sum(p.ds_tensor.numel() for p in params),
        "total": sum(p.ds_numel for p in params),
        "even_split": all(p.ds_tensor.numel() == math.ceil(p.ds_numel / world) for p in params),
        "placeholders_empty": all(p.numel() == 0 for p in params),  # nothing whole is left outside a forward
        "dtypes": sorted({str(p.ds_tensor.dtype) for p in params}),
    }


def _run(bf16: bool, accelerator: Accelerator, ids: torch.Tensor) -> dict:
    accelerator.state.deepspeed_plugin.deepspeed_config["bf16"] = {"enabled": bf16}
    whole = _teacher().eval()
    sharded = deepspeed_teacher(_teacher(), accelerator)
    gc.collect()  # the engine object is gone: the module must work on its own
    with torch.no_grad():
        got = sharded(input_ids=ids).logits.float()
        want = (whole.to(torch.bfloat16) if bf16 else whole)(input_ids=ids).logits.float()
    return {**_holdings(sharded, accelerator.num_processes), "training": sharded.training,
            "requires_grad": any(p.requires_grad for p in sharded.parameters()),
            "max_abs_diff": (got - want).abs().max().item()}


def main() -> None:
    PartialState(backend="gloo")
    plugin = DeepSpeedPlugin(zero_stage=3, zero3_init_flag=False, offload_param_device="none",
                             offload_optimizer_device="none")
    accelerator = Accelerator(deepspeed_plugin=plugin)
    rank = accelerator.process_index
    # Each process feeds its own batch: the all-gathers must serve different data on each rank.
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(rank))
    result = {"rank": rank, "world_size": accelerator.num_processes,
              "distributed_type": str(accelerator.distributed_type),
              "float32": _run(False, accelerator, ids), "bf16": _run(True, accelerator, ids)}
    Path(os.environ["CHECK_DIR"], f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
