"""DistiLLM's adaptive off-policy schedule for a policy stage (`onpolicy.adaptive`).

The share of micro-batches the student samples (GKD's lmbda) starts low and rises by a step after every evaluation
whose validation loss did not improve on the best so far: student-generated outputs are costly and, early on, poor,
so they enter when training on the fixed data stops paying (Ko et al., "DistiLLM", 2024). The share is a pure function
of the evaluations logged so far, recomputed from Trainer's log history, so a resumed stage carries on with the share
the uninterrupted one had without saving anything of its own.
"""

from __future__ import annotations

import math

from transformers import TrainerCallback

from lmdistill.config import AdaptiveOffPolicySettings


def student_share(losses: list[float], settings: AdaptiveOffPolicySettings) -> float:
    """The share after the evaluations `losses` (oldest first): start, plus one step per loss that did not improve."""
    share, best = settings.start, math.inf
    for loss in losses:
        if loss < best - settings.min_delta:
            best = loss
        else:
            share = min(settings.max, share + settings.step)
    return share


def logged_losses(log_history: list[dict], metric: str) -> list[float]:
    """The values of `metric` in Trainer's log history, in order."""
    return [entry[metric] for entry in log_history if metric in entry]


class AdaptiveShare(TrainerCallback):
    """Sets `trainer.lmbda` from the evaluations logged so far, at the start (a resume) and after each evaluation."""

    def __init__(self, trainer, settings: AdaptiveOffPolicySettings) -> None:
        self.trainer = trainer
        self.settings = settings

    def _update(self, state) -> None:
        self.trainer.lmbda = student_share(logged_losses(state.log_history, self.settings.metric), self.settings)

    def on_train_begin(self, args, state, control, **kwargs):
        self._update(state)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        # Trainer has logged these metrics (into log_history) before calling this hook.
        self._update(state)
