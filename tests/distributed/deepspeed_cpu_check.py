"""DeepSpeed ZeRO-3 on CPU processes, for launch by test_deepspeed_cpu.py (not a test module). Two modes:

`engine` (under torchrun): each process builds accelerate's DeepSpeed ZeRO-3 setup (the plugin that
examples/accelerate/deepspeed_zero3.yaml gives, "auto" values included), hands two tiny Llama teachers to
`deepspeed_teacher` (one float32, one under bf16) and writes CHECK_DIR/rank{RANK}.json with what it holds and what
the teachers computed, next to a whole copy of each.

`run CONFIG` (under accelerate launch): `lmdistill run CONFIG`, where each process writes CHECK_DIR/run-rank{RANK}.json
right after training: the launch it trained in, the parts of the teacher and the student it holds, and the losses.

Accelerate only enables DeepSpeed for a non-CPU device, and with no GPU it picks no process-group backend (it then
says num_processes 1 on every rank); naming the backend (gloo) before the Accelerator is built fixes both. DeepSpeed
itself runs on the CPU with DS_ACCELERATOR=cpu.
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
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


def engine_check() -> None:
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


def run_check(config: str) -> None:
    from lmdistill import cli
    from lmdistill.train.trainer import DistillationTrainer

    train = DistillationTrainer.train

    def probed_train(trainer, *args, **kwargs):
        output = train(trainer, *args, **kwargs)
        world = trainer.accelerator.num_processes
        record = {"world_size": world, "distributed_type": str(trainer.accelerator.distributed_type),
                  "teacher": _holdings(trainer.teacher, world), "student": _holdings(trainer.model, world),
                  "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]}
        rank = trainer.accelerator.process_index
        Path(os.environ["CHECK_DIR"], f"run-rank{rank}.json").write_text(json.dumps(record))
        return output

    DistillationTrainer.train = probed_train
    sys.argv = ["lmdistill", "run", config]
    cli.main()


if __name__ == "__main__":
    if sys.argv[1] == "engine":
        engine_check()
    else:
        run_check(sys.argv[2])
