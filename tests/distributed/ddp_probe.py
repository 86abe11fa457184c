"""`lmdistill run` with probes, for launch under torchrun / accelerate launch in tests (not a test module).

Each process writes PROBE_DIR/probe-rank{RANK}.json with: the world size it trained in, the example ids of every
training micro-batch it computed a loss on, the example ids of the whole stage dataset in order, digests of its
student weights and of the loss terms' projections after training, the teacher parameters it held (and the
teacher's total), and the pipeline writes (state, config, model folders, export) it performed. With PROBE_NAN=R:S,
process R's loss is NaN at step S, and each process records which optimizer steps it skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from lmdistill import cli
from lmdistill.models.sharding import local_parameter_count
from lmdistill.train import pipeline
from lmdistill.train.state import PipelineState
from lmdistill.train.trainer import DistillationTrainer

record: dict = {"batches": [], "writes": []}


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors in name order: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _wrap(owner, name: str, before=None, after=None) -> None:
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        if before:
            before(*args, **kwargs)
        result = original(*args, **kwargs)
        if after:
            after(result, *args, **kwargs)
        return result

    setattr(owner, name, wrapped)


def _on_loss(trainer, model, inputs, *args, **kwargs) -> None:
    if model.training:
        record["batches"].append(inputs["example_id"].tolist())


def _on_trained(_, trainer, *args, **kwargs) -> None:
    record.update(world_size=dist.get_world_size() if dist.is_initialized() else 1,
                  trainer_processes=trainer.accelerator.num_processes,
                  digest=weights_digest(trainer.model.state_dict()),
                  projections_digest=weights_digest(trainer._aux_modules().state_dict()))
    if trainer.teacher is not None:
        record["teacher_params"] = local_parameter_count(trainer.teacher)


def _on_dataset(dataset, *args, **kwargs) -> None:
    record["dataset"] = [dataset[i]["example_id"] for i in range(len(dataset))]


def _write(what: str):
    return lambda *args, **kwargs: record["writes"].append(what)


def _nan_on(rank_and_step: str) -> None:
    """PROBE_NAN=R:S: process R's loss is NaN at optimizer step S (0-based), as a diverging batch would make it."""
    rank, step = map(int, rank_and_step.split(":"))
    combine = DistillationTrainer._combine

    def combined(self, model, terms, weights):
        total = combine(self, model, terms, weights)
        if model.training and int(os.environ.get("RANK", "0")) == rank and self.state.global_step == step:
            record["nan_steps"] = record.get("nan_steps", 0) + 1
            return total * float("nan")
        return total

    DistillationTrainer._combine = combined


def install_probes() -> None:
    _wrap(DistillationTrainer, "compute_loss", before=_on_loss)
    _wrap(DistillationTrainer, "train", after=_on_trained)
    _wrap(pipeline, "build_train_dataset", after=_on_dataset)
    _wrap(pipeline, "replace_dir_atomic", before=lambda tmp, final: record["writes"].append(Path(final).name))
    _wrap(pipeline, "save_config", before=_write("config"))
    _wrap(pipeline, "export_final", before=_write("export"))
    _wrap(PipelineState, "save", before=_write("state"))
    if os.environ.get("PROBE_NAN"):
        _nan_on(os.environ["PROBE_NAN"])
        _wrap(DistillationTrainer, "_step_is_skipped",
              after=lambda skipped, *a, **k: record.setdefault("skipped", []).append(skipped))


if __name__ == "__main__":
    install_probes()  # only in the launched processes: importing this module (the test does) patches nothing
    try:
        cli.main()
    finally:
        rank = int(os.environ.get("RANK", "0"))
        Path(os.environ["PROBE_DIR"], f"probe-rank{rank}.json").write_text(json.dumps(record))
