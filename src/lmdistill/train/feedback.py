"""Evaluation-driven sampling: after each evaluation, sample more from where the student trails the teacher most.

The gap is the teacher-student KL per counted token on each eval set named like a training source (or on each
bucket, when eval rows carry a `bucket`/`category` field). The mixture's weights move toward the larger gaps,
bounded so that no source vanishes. The feedback history is saved in every checkpoint (written through the
trainer's checkpoint_writers, before trainer_state.json marks the checkpoint complete, so a run killed in between
never resumes without it), so a stage resumed from one draws the batches the uninterrupted run drew.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lmdistill.config import EvalDrivenSettings
from lmdistill.data.mixture import MixtureDataset, reweight_by_gap
from lmdistill.eval.metrics import agreement_and_kl
from lmdistill.models.sharding import release_gathered

log = logging.getLogger(__name__)
STATE_FILE = "mixture_feedback.json"
MAX_EXAMPLES_PER_GROUP = 64


def gap_groups(eval_sets: dict[str, list[dict]], train_groups: list[str]) -> dict[str, list[dict]]:
    """Eval examples grouped by the mixture's groups: buckets when the examples carry them, else source names."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for name, examples in eval_sets.items():
        for ex in examples:
            key = ex.get("bucket") or name
            if key in train_groups and len(groups[key]) < MAX_EXAMPLES_PER_GROUP:
                groups[key].append(ex)
    return dict(groups)


class EvalDrivenSampling(TrainerCallback):
    def __init__(self, dataset: MixtureDataset, teacher: torch.nn.Module, eval_sets: dict[str, list[dict]],
                 settings: EvalDrivenSettings, batch_size: int = 8):
        self.dataset = dataset
        self.teacher = teacher
        self.groups = gap_groups(eval_sets, dataset.groups())
        self.settings = settings
        self.batch_size = batch_size
        if len(self.groups) < 2:
            log.warning("evaluation-driven sampling needs eval sets named like >= 2 training sources or buckets "
                        "(found %s); weights stay as scheduled", sorted(self.groups))

    @staticmethod
    def _checkpoint_file(args, state) -> Path:
        # Trainer's own checkpoint folder for this step (Trainer._save_checkpoint names it so).
        return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / STATE_FILE

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            return
        path = self._checkpoint_file(args, state)  # resumed: the history up to the checkpoint, before any read
        if path.exists():
            self.dataset.load_state_dict(json.loads(path.read_text()))
        else:
            log.warning("the checkpoint at step %d has no %s: evaluation-driven sampling starts over from the "
                        "scheduled weights", state.global_step, STATE_FILE)

    def save(self, checkpoint: str | Path) -> None:
        """Write the feedback history into `checkpoint` (the trainer calls it on the main process, before the
        checkpoint counts as complete)."""
        (Path(checkpoint) / STATE_FILE).write_text(json.dumps(self.dataset.state_dict()))

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if len(self.groups) < 2 or model is None:
            return
        gaps = {name: agreement_and_kl(self.teacher, model, examples, self.batch_size)["kl_teacher_student"]
                for name, examples in self.groups.items()}
        release_gathered(self.teacher)  # a sharded teacher back to its shards before training goes on
        current = self.dataset.current_feedback(list(gaps))
        weights = reweight_by_gap(gaps, current, sharpness=self.settings.sharpness,
                                  min_weight=self.settings.min_weight)
        # Every process plans the same draws: the main process's weights hold (float noise in each process's own
        # gaps could otherwise tip a draw one way here and the other way there).
        weights = broadcast_object_list([weights])[0]
        self.dataset.set_feedback(weights)
        log.info("step %d: teacher-student gap %s -> sampling weights %s", state.global_step,
                 {k: round(v, 4) for k, v in gaps.items()}, {k: round(v, 3) for k, v in weights.items()})
