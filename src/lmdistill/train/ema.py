"""Self-distillation from an exponential moving average of the student (`teacher: {self: ema, decay: d}`).

After every optimizer step: ema = decay * ema + (1 - decay) * student. The average is written beside each checkpoint
(ema_teacher.safetensors) and read back on resume, so a resumed stage continues from the same teacher."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from lmdistill.models.load import freeze
from lmdistill.train.heads import unwrapped

EMA_FILE = "ema_teacher.safetensors"


class EmaTeacher(TrainerCallback):
    """`model` is the frozen average (the stage's teacher); the callback keeps it up to date, `save` checkpoints it."""

    def __init__(self, student: nn.Module, decay: float) -> None:
        self.model = freeze(copy.deepcopy(unwrapped(student)))
        self.decay = decay

    @torch.no_grad()
    def on_step_end(self, args, state, control, model=None, **kwargs):
        for ema, live in zip(self.model.parameters(), unwrapped(model).parameters()):
            ema.lerp_(live.detach().to(ema.dtype), 1.0 - self.decay)

    def save(self, checkpoint: str | Path) -> None:
        """Write the average into `checkpoint` (the trainer calls it before the checkpoint counts as complete)."""
        from safetensors.torch import save_file

        save_file({name: p.detach().cpu().contiguous() for name, p in self.model.named_parameters()},
                  os.path.join(checkpoint, EMA_FILE))

    def load(self, checkpoint: str | Path) -> bool:
        """The average saved with `checkpoint`; False when it holds none (the average restarts from the student)."""
        path = os.path.join(checkpoint, EMA_FILE)
        if not os.path.exists(path):
            return False
        from safetensors.torch import load_file

        saved = load_file(path)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(saved[name])
        return True
