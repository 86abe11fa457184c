"""The launched processes and who writes: under torchrun / accelerate launch every process runs the same code, and
the main process alone writes each file while the others wait for it (no file has two writers, and no process reads
a half-written one)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lmdistill.config import PipelineConfig
from lmdistill.models.sharding import is_sharded


def launched_processes(config: PipelineConfig):
    """accelerate's view of the launch: one process, or those torchrun / accelerate launch started. Created before
    the first write, with the backend Trainer will use (gloo when training on CPU)."""
    from accelerate import PartialState

    return PartialState(cpu=config.training.no_cuda or not torch.cuda.is_available())


def main_writes(processes, write: Callable[[], object]) -> None:
    """One writer per file: `write` runs on the main process, and every process waits until it has finished."""
    if processes.is_main_process:
        write()
    processes.wait_for_everyone()


def scores_and_writes(processes, teacher, work: Callable[[bool], object]) -> None:
    """Scoring with the teacher, then files: `work(write)` runs on the main process while the others wait, or, when
    the teacher is sharded (its forward passes are collective), on every process, the main one alone writing."""
    if is_sharded(teacher):
        work(processes.is_main_process)
    elif processes.is_main_process:
        work(True)
    processes.wait_for_everyone()
