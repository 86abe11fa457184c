"""Out of memory while distilling: one line that names the settings which lower the memory of a step."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from lmdistill.errors import TrainingError

KNOBS = ("set the stage's fused: true (full logits never formed; chunk_size, tokens per loss chunk, bounds its blocks), "
         "teacher_source: cache (teacher log-probs read from disk, no live teacher), or a smaller batch_size with "
         "more gradient_accumulation_steps (same effective batch)")


@contextmanager
def out_of_memory_hint(where: str) -> Iterator[None]:
    """Turns an accelerator out-of-memory error raised inside into a TrainingError naming `where` and the knobs."""
    try:
        yield
    except torch.OutOfMemoryError as err:
        raise TrainingError(f"out of memory in {where}; to fit, {KNOBS}") from err
