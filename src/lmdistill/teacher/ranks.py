"""Which process am I: the part of accelerate's PartialState that cache-teacher and generate use to split work.

Under `torchrun` / `accelerate launch` the commands receive the PartialState itself; everything else (tests, the
pipeline's own main-process calls) gets ONE_PROCESS, for which the barrier has nobody to wait for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeVar

T = TypeVar("T")


class Processes(Protocol):
    process_index: int
    num_processes: int
    is_main_process: bool

    def wait_for_everyone(self) -> None: ...


@dataclass(frozen=True)
class OneProcess:
    process_index: int = 0
    num_processes: int = 1
    is_main_process: bool = True

    def wait_for_everyone(self) -> None:
        """A single process has nobody to wait for."""


ONE_PROCESS = OneProcess()


def my_share(items: list[T], processes: Processes) -> list[T]:
    """Items process r of W works on: r, r + W, r + 2W, ... (together the processes cover each item once)."""
    return items[processes.process_index::processes.num_processes]
