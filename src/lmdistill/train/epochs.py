"""Epochs over the stage's sources, as the user counts them.

Trainer reads a stage's mixture dataset as one epoch, and that dataset holds all of the stage's draws (`epochs`
passes over the sources, see stage_draws). Left alone, the logged epoch would go 0 -> 1 over a 40-epoch stage and
`eval_strategy: epoch` would evaluate once, at the end. This callback rescales Trainer's epoch counter to passes over
the sources (logs, TensorBoard, trainer_state.json) and, under Trainer's epoch strategies, evaluates and saves at
the end of every such pass; Trainer's own end-of-epoch evaluation and save cover the last one.
"""

from __future__ import annotations

import math

from transformers import TrainerCallback
from transformers.trainer_utils import IntervalStrategy, SaveStrategy


class SourceEpochs(TrainerCallback):
    def __init__(self, passes: float) -> None:
        """passes: epochs over the sources in the one epoch Trainer sees (draws / rows of the stage's sources)."""
        self.passes = passes
        self.last = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = state.epoch or 0.0  # resumed: the (already rescaled) epoch of the checkpoint

    def on_step_end(self, args, state, control, **kwargs):
        # Trainer has just set its epoch to the share of its one epoch done; ours is that many passes.
        state.epoch = state.epoch * self.passes
        ended = math.floor(state.epoch + 1e-9) > math.floor(self.last + 1e-9)
        self.last = state.epoch
        if ended and state.global_step < state.max_steps:
            if args.eval_strategy == IntervalStrategy.EPOCH:
                control.should_evaluate = True
            if args.save_strategy == SaveStrategy.EPOCH:
                control.should_save = True
