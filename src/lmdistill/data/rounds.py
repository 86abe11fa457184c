"""Whole rounds of rows for the training processes, so that an epoch trains every row once.

With several processes, every step reads one batch per process: a round. When the rows do not fill the last round,
accelerate (`even_batches`, as torch's DistributedSampler pads) completes it with rows read again from the start,
and those rows would train twice in the epoch. `WholeRounds` completes the last round itself, with rows marked as
fillers, so accelerate has nothing left to complete; the collator carries the mark into the batch (`FILLER`), and
the trainer masks those rows' labels (`drop_fillers`) before it counts the step's tokens: fillers count nothing in
the loss, its token count or the logged terms, while every process still runs the same steps (no process waits at
a gradient sync for a batch another never reads).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from lmdistill.data.tokenize import IGNORE_INDEX

FILLER = "filler"  # example and batch key: a row read again only to complete the last round


class WholeRounds(Dataset):
    """A map-style dataset of dict items lengthened to a multiple of `round_size` items: those past its end are its
    first items again, marked FILLER."""

    def __init__(self, dataset, round_size: int) -> None:
        self.dataset, self.rows = dataset, len(dataset)
        self.length = -(-self.rows // round_size) * round_size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} rows")
        if index < self.rows:
            return self.dataset[index]
        return {**self.dataset[index % self.rows], FILLER: True}


def whole_rounds(dataset, round_size: int):
    """`dataset` completed to whole rounds of `round_size` rows; itself when it fills them already (or is empty)."""
    rows = len(dataset)
    return dataset if rows == 0 or rows % round_size == 0 else WholeRounds(dataset, round_size)


def filler_rows(examples: list[dict]) -> torch.Tensor | None:
    """[B] bool: which of a batch's examples are fillers (None when none is)."""
    if not any(e.get(FILLER) for e in examples):
        return None
    return torch.tensor([bool(e.get(FILLER)) for e in examples])


def without_fillers(batch: dict, read: dict) -> dict | None:
    """The rows of `batch` (made from the batch `read`, row for row) that `read` does not mark as fillers, unmarked;
    None when every row is one. `read` keeps its mark."""
    fillers = read.get(FILLER)
    rows = {key: value for key, value in batch.items() if key != FILLER}
    if fillers is None:
        return rows
    if fillers.all():
        return None
    return {key: value[~fillers.to(value.device)] for key, value in rows.items()}


def drop_fillers(batch: dict, read: dict | None = None) -> dict:
    """`batch` with the labels of the rows that `read` (default: batch itself; the batch as read, when `batch` was
    made from it row for row) marks as fillers set to -100, their aligned pairs with a teacher's tokens (if any) to
    -1 (none), and the mark removed from both."""
    fillers = (batch if read is None else read).pop(FILLER, None)
    batch.pop(FILLER, None)
    if fillers is not None:
        for key, none in (("labels", IGNORE_INDEX), ("pairs", -1)):
            if key in batch:
                rows = fillers.to(batch[key].device).view(-1, *[1] * (batch[key].dim() - 1))
                batch[key] = batch[key].masked_fill(rows, none)
    return batch
