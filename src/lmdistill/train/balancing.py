"""The loss balancer as training drives it (a mixin of DistillationTrainer).

`loss_scale` and `gradnorm` reweigh the terms of training steps only: evaluation reports the plain weighted objective,
so `eval_loss` and the choice of best/ mean the same with or without a balancer (a balancer's total is about the sum
of the weights whatever the model, and gradnorm needs gradients that evaluation does not build). The balancer's
running state is saved with every checkpoint beside the optimizer's and read back on resume, and an optimizer step
skipped for a non-finite loss leaves it as that step found it. Under several processes the balancer sees the mean over
the processes of each statistic it reads, so every process keeps the same state (and the saved one is everyone's).
"""

from __future__ import annotations

import copy
import json
import os

import torch

from lmdistill.losses import LossBalancer

BALANCER_FILE = "balancer_state.json"


class BalancedTraining:
    """Mixin before transformers.Trainer: `balancer` (None: the plain weighted sum) combines the loss terms."""

    balancer: LossBalancer | None = None
    _balancer_step_start: dict | None = None  # the state this optimizer step started from

    def _combine(self, model, terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
        if self.balancer is None or not model.training:
            return sum(weights[name] * value for name, value in terms.items())
        if self._balancer_step_start is None:
            self._balancer_step_start = copy.deepcopy(self.balancer.state_dict())
        shared = [p for p in model.parameters() if p.requires_grad][-1:]
        average = None
        if self.accelerator.num_processes > 1:
            def average(stats: torch.Tensor) -> torch.Tensor:
                return self.accelerator.reduce(stats, "mean")
        return self.balancer.combine(terms, weights, shared_params=shared, average=average)

    def _end_balancer_step(self, skipped: bool) -> None:
        """After an optimizer step: a skipped one gives the balancer back the state it started from."""
        if skipped and self._balancer_step_start is not None:
            self.balancer.load_state_dict(self._balancer_step_start)
        self._balancer_step_start = None

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.balancer is not None and self.args.should_save:
            tmp = os.path.join(output_dir, f".{BALANCER_FILE}.tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.balancer.state_dict(), f)
            os.replace(tmp, os.path.join(output_dir, BALANCER_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, BALANCER_FILE) if checkpoint else None
        if self.balancer is not None and path and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                self.balancer.load_state_dict(json.load(f))
