"""A warning before a mode-seeking stage trains a student that was never trained.

Reverse KL and on-policy objectives weigh the teacher's log-probabilities by the student's own distribution; a
randomly initialised student spreads its mass evenly, so the gradient carries little of the teacher and the
student collapses (observed: the loss stuck near its start, the student writing only spaces). A forward KL or CE
stage first gives it a distribution to refine. "Never trained" is read from the student itself: its perplexity on
a few training examples is close to the vocabulary size, as a uniform guess would score.

The probe runs on the main process alone. A student split over the processes (FSDP, DeepSpeed ZeRO-3) cannot be
probed so: its forward passes are collective, and one run on a single process would hang the others (a ZeRO-3
partition not yet in its engine cannot run one at all). Its check is skipped, with a note in the log.
"""

from __future__ import annotations

import logging
import math

import torch

from lmdistill.config import LogitTerm, StageSettings
from lmdistill.data.tokenize import IGNORE_INDEX
from lmdistill.eval.metrics import perplexity
from lmdistill.models.sharding import is_sharded

log = logging.getLogger(__name__)

MODE_SEEKING_LOSSES = ("reverse_kl", "skew_reverse_kl")
# log-perplexity at or above this share of log(vocabulary) counts as a uniform guess
UNTRAINED_SHARE = 0.9
_PROBE_EXAMPLES = 8


def mode_seeking(stage: StageSettings) -> str | None:
    """What makes the stage mode-seeking, in words, or None."""
    if stage.kind == "policy":
        return "an on-policy stage (the student samples its own completions)"
    names = [t.name for t in stage.losses if isinstance(t, LogitTerm) and t.name in MODE_SEEKING_LOSSES and t.weight]
    return f"its {' and '.join(names)} loss" if names else None


def warn_if_cold_start(stage: StageSettings, student: torch.nn.Module, sources: dict[str, list[dict]],
                       vocab_size: int) -> bool:
    """Log a warning when `stage` is mode-seeking and `student` scores a few of the `sources`' examples about as
    well as a uniform guess over `vocab_size` ids; returns whether it warned. Called on the main process alone: a
    sharded student is not probed (a note says so)."""
    reason = mode_seeking(stage)
    if reason is None:
        return False
    if is_sharded(student):
        log.info("stage %s: the student is sharded over the processes (FSDP / DeepSpeed ZeRO-3), so the check that it "
                 "is not an untrained student before this mode-seeking stage (%s) is skipped; a random student should "
                 "be warm-started with a forward_kl or cross_entropy stage first (README: \"Base models and plain "
                 "text\").", stage.name, reason)
        return False
    probe = [ex for rows in sources.values() for ex in rows if any(t != IGNORE_INDEX for t in ex["labels"])]
    if not probe:
        return False
    ppl = perplexity(student, probe[:_PROBE_EXAMPLES], batch_size=_PROBE_EXAMPLES)
    if math.log(ppl) < UNTRAINED_SHARE * math.log(vocab_size):
        return False
    log.warning("stage %s: the student looks untrained (perplexity %.0f on %d training examples, vocabulary %d) and "
                "the stage is mode-seeking (%s): from a random student this tends to collapse. Warm-start it with a "
                "forward_kl or cross_entropy stage first (README: \"Base models and plain text\").", stage.name, ppl,
                min(len(probe), _PROBE_EXAMPLES), vocab_size, reason)
    return True
