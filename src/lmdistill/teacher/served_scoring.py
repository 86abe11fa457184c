"""A served teacher (teacher.endpoint) as a stage's live teacher: the top-k log-probs of whatever tokens a batch holds
(the student's samples in a policy stage, teacher generations in a non_policy one, the data in a distill one), asked
from the server as the stage trains, and the teacher's samples when a policy stage wants them (`seq_kd`).

The trainer reads it as it reads a teacher cache (train.trainer.TeacherCacheLookup): ids, log-probs and tail mass at
every counted token, which `DistillObjective.cached` turns into the top-k KL (forward_kl; cross_entropy beside it).
Each row of a micro-batch goes to `/v1/completions` as token ids with `prompt_logprobs: k`, the rows concurrently
(teacher.endpoint_concurrency in flight); retries, timeouts and malformed answers are endpoint.py's, so a failure
stops the stage with one line and a re-run resumes from its last checkpoint.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from lmdistill.config import GenerationSettings, LogitTerm, PipelineConfig, StageSettings
from lmdistill.data.tokenize import IGNORE_INDEX
from lmdistill.errors import ConfigError, TrainingError
from lmdistill.teacher.endpoint import EndpointError, EndpointTeacher
from lmdistill.teacher.sampling import server_sampling

log = logging.getLogger(__name__)

# What the top-k of a served teacher can train: the cache path's terms (DistillObjective._cached_specs).
SERVED_LOSSES = ("forward_kl", "cross_entropy")


class ServedScorer:
    """The trainer's top-k teacher on a server: `lookup` scores a batch's own tokens, `completions` samples."""

    cache_temperature = 1.0  # the server's log-probs are log-softmax(logits), at temperature 1
    scores_any_tokens = True  # unlike a cache, it scores sequences no dataset holds (the student's samples)

    def __init__(self, teacher: EndpointTeacher, k: int, tail: str, vocab_size: int) -> None:
        self.teacher, self.k, self.tail, self.vocab_size = teacher, k, tail, vocab_size
        self._ahead: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}  # prefetched rows, by their tokens and labels

    def prefetch(self, batches: list[dict[str, Tensor]]) -> None:
        """Score the rows of a whole step's micro-batches at once (all of them in flight together, up to
        teacher.endpoint_concurrency); their lookups then read these answers. Replaces the previous step's."""
        rows = dict(pair for batch in batches for pair in self._rows(batch, batch["labels"][:, 1:]))
        self._ahead = dict(zip(rows, self._capture(list(rows.values()))))

    def lookup(self, batch: dict[str, Tensor], labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """batch: a right-padded causal batch (input_ids, attention_mask [B, T]); labels [B, T - 1] its labels after
        the causal shift. Returns ids [B, T - 1, k] int64, log-probs [B, T - 1, k] float32 (most likely first) and
        the tail mass 1 - sum(kept) [B, T - 1], zeros where labels are -100."""
        rows = self._rows(batch, labels)
        missing = {key: row for key, row in rows if key not in self._ahead}
        answers = self._ahead | dict(zip(missing, self._capture(list(missing.values()))))
        counted = (labels != IGNORE_INDEX).cpu()
        out_ids = torch.zeros(*labels.shape, self.k, dtype=torch.int64)
        out_lps = torch.zeros(*labels.shape, self.k, dtype=torch.float32)
        out_tail = torch.zeros(*labels.shape, dtype=torch.float32)
        for b, (key, _) in enumerate(rows):
            where = counted[b].nonzero().squeeze(1)
            out_ids[b, where], out_lps[b, where], out_tail[b, where] = answers[key]
        device = labels.device
        return out_ids.to(device), out_lps.to(device), out_tail.to(device)

    def _rows(self, batch: dict[str, Tensor], labels: Tensor) -> list[tuple[tuple, dict]]:
        """Per row of the batch (right-padded, checked): (its tokens and shifted labels up to its last token, the
        row as capture reads it, in causal layout)."""
        mask, counted = batch["attention_mask"].cpu(), (labels != IGNORE_INDEX).cpu()
        ids, shifted = batch["input_ids"].tolist(), labels.tolist()
        rows = []
        for b, n in enumerate(mask.sum(dim=1).tolist()):
            if not mask[b, :n].all():
                raise TrainingError("a served teacher scores right-padded batches, but a row has padding before its "
                                    "tokens; pad causal batches on the right (DistillCollator)")
            if counted[b, max(n - 1, 0):].any():
                raise TrainingError(f"row {b} of the batch counts a label past its last token; its labels and "
                                    "attention_mask disagree")
            key = (tuple(ids[b][:n]), tuple(shifted[b][: n - 1]))
            # capture counts position t where labels[t + 1] is counted, i.e. where the shifted labels are.
            rows.append((key, {"input_ids": ids[b][:n], "labels": [IGNORE_INDEX, *shifted[b][: n - 1]]}))
        return rows

    def _capture(self, rows: list[dict]) -> list[tuple[Tensor, Tensor, Tensor]]:
        answers = self.teacher.capture(rows, self.k) if rows else []
        for row_ids, _, _ in answers:
            if len(row_ids) and int(row_ids.max()) >= self.vocab_size:
                raise EndpointError(f"teacher server {self.teacher.url} returned token id {int(row_ids.max())}, "
                                    f"past the {self.vocab_size} ids teacher and student share")
        return answers

    def completions(self, prompts: list[list[int]], settings: GenerationSettings, seed: int) -> list[list[int]]:
        """One teacher completion per prompt, sampled by the server as `settings` say (seeded: a rerun asks for
        the same)."""
        answers = self.teacher.generate(prompts, 1, settings.max_new_tokens, server_sampling(settings), seed)
        return [samples[0][0] for samples in answers]


def served_losses_check(stages: list[StageSettings]) -> None:
    """Refuse, before any work, a stage whose logit terms need more of the teacher than its top-k."""
    for stage in stages:
        other = [t.name for t in stage.losses if isinstance(t, LogitTerm) and t.name not in SERVED_LOSSES]
        if other and stage.kind != "finetune" and stage.teacher_source != "cache":
            raise ConfigError(f"stage {stage.name!r} trains on {', '.join(other)}, but a served teacher "
                              f"(teacher.endpoint) gives its top-k log-probs only, which train forward_kl (top-k, as a "
                              "teacher cache does) and cross_entropy: switch the stage to forward_kl, or remove "
                              "teacher.endpoint to load the teacher here")


def served_scorer(config: PipelineConfig, teacher: EndpointTeacher | None, stage: StageSettings, needs_teacher: bool,
                  shared_vocab: int | None) -> ServedScorer | None:
    """The stage's served teacher: when the run's teacher is served and the stage scores against it (logit KD that
    reads no cache) or samples from it (a policy stage); None otherwise. k and the tail treatment are
    teacher_cache.k / teacher_cache.tail, as for a cache."""
    if teacher is None or stage.teacher_source == "cache" or not (needs_teacher or stage.kind == "policy"):
        return None
    vocab_size = shared_vocab or teacher.vocab_size
    k = min(config.teacher_cache.k, vocab_size)
    if k < vocab_size and stage.temperature != 1.0:
        # As for a cache captured at T = 1: the kept ids re-temper exactly, the tail's share only roughly.
        log.warning("stage %s: KD temperature %s with a served teacher's top-%d log-probs (temperature 1): the mass "
                    "outside the top k is re-tempered approximately", stage.name, stage.temperature, k)
    log.info("stage %s: the teacher's top-%d log-probs come from %s as the stage trains", stage.name, k, teacher.url)
    return ServedScorer(teacher, k, config.teacher_cache.tail, vocab_size)
