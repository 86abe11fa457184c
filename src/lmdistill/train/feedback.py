"""Evaluation-driven sampling: after each evaluation, sample more from where the student trails the teacher most.

The gap is the teacher-student KL per counted token on each eval set named like a training source (or on each
bucket, when eval rows carry a `bucket`/`category` field). The mixture's weights move toward the larger gaps,
bounded so that no source vanishes; the multipliers are saved in the stage folder so a resumed stage keeps them.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

import torch
from transformers import TrainerCallback

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
                 settings: EvalDrivenSettings, stage_dir: Path, batch_size: int = 8):
        self.dataset = dataset
        self.teacher = teacher
        self.groups = gap_groups(eval_sets, dataset.groups())
        self.settings = settings
        self.state_path = stage_dir / STATE_FILE
        self.batch_size = batch_size
        if self.state_path.exists():
            dataset.set_feedback(json.loads(self.state_path.read_text()))
        if len(self.groups) < 2:
            log.warning("evaluation-driven sampling needs eval sets named like >= 2 training sources or buckets "
                        "(found %s); weights stay as scheduled", sorted(self.groups))

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if len(self.groups) < 2 or model is None:
            return
        gaps = {name: agreement_and_kl(self.teacher, model, examples, self.batch_size)["mean_kl"]
                for name, examples in self.groups.items()}
        release_gathered(self.teacher)  # a sharded teacher back to its shards before training goes on
        current = self.dataset.current_feedback(list(gaps))
        weights = reweight_by_gap(gaps, current, sharpness=self.settings.sharpness,
                                  min_weight=self.settings.min_weight)
        self.dataset.set_feedback(weights)
        if state.is_world_process_zero:
            self.state_path.write_text(json.dumps(weights))
        log.info("step %d: teacher-student gap %s -> sampling weights %s", state.global_step,
                 {k: round(v, 4) for k, v in gaps.items()}, {k: round(v, 3) for k, v in weights.items()})
