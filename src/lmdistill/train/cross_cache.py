"""Logit KD across tokenizers from a teacher cache (a stage with uld / cross_vocab_kl and teacher_source: cache).

`lmdistill cache-teacher` with a teacher of another tokenizer stores, per example, the teacher's top-k over its own
vocabulary at the teacher position of every aligned pair, and the pairs (lmdistill.teacher.cache). Training then
needs neither the teacher nor its tokens: each batch looks its pairs and rows up by example id, and the top-k forms
of the losses (lmdistill.losses.cross_vocab) score the student's logits at the pairs' student positions. Each term
is a sum over pairs divided by the student's counted tokens, as in the live form (train/cross_tokenizer.py).

The teacher's tokenizer is still loaded (not its weights): to check that the cache was made with it, and for the
token strings both vocabularies share (cross_vocab_kl).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import Tensor

from lmdistill.config import CrossVocabTerm, PipelineConfig, StageSettings
from lmdistill.data.cache import tokenizer_hash
from lmdistill.errors import ConfigError
from lmdistill.losses.cross_vocab import shared_vocabulary, topk_cross_vocab_kl, topk_uld
from lmdistill.models.load import load_tokenizer
from lmdistill.teacher.reader import PairedCacheLookup
from lmdistill.teacher.stage import open_paired_cache

log = logging.getLogger(__name__)


@dataclass
class CachedCrossVocabTeacher:
    """The uld / cross_vocab_kl terms against a cache captured across tokenizers (the trainer's cross_vocab)."""

    lookup: PairedCacheLookup
    weights: dict[str, float]
    temperature: float
    tail: str  # teacher_cache.tail: "bucket" spreads the stored tail over the other ids, "drop" leaves it out
    shared: tuple[Tensor, Tensor]  # (student ids, teacher ids) of the token strings both vocabularies hold

    def terms(self, student_logits: Tensor, inputs: dict[str, Tensor], num_items) -> dict[str, Tensor]:
        """Each term's sum over the batch's cached pairs divided by num_items (counted tokens; this batch's pairs
        when None). student_logits [B, T, V_s], unshifted: a pair's student position predicts the next token."""
        rows, positions, ids, logprobs, tail = self.lookup.lookup(inputs.get("example_id"), inputs["labels"])
        rows, positions = rows.to(student_logits.device), positions.to(student_logits.device)
        s_rows = student_logits[rows, positions]
        manifest = self.lookup.cache.manifest
        common = dict(teacher_vocab=manifest.vocab_size, temperature=self.temperature,
                      cache_temperature=manifest.temperature, tail=self.tail)
        denom = max(float(num_items if num_items is not None else len(rows)), 1.0)
        out = {}
        for name in self.weights:
            if name == "uld":
                out[name] = topk_uld(s_rows, logprobs, tail, **common) / denom
            else:
                out[name] = topk_cross_vocab_kl(s_rows, ids, logprobs, tail, *self.shared, **common) / denom
        return out


def cached_cross_vocab(config: PipelineConfig, prep, stage: StageSettings,
                       train_names: list[str]) -> tuple[CachedCrossVocabTeacher, list[dict]]:
    """For a stage with uld / cross_vocab_kl and teacher_source: cache, reading `train_names` (in MixtureDataset
    order): its cached teacher and the eval examples with example ids."""
    terms = [t for t in stage.losses if isinstance(t, CrossVocabTerm)]
    if not config.teacher.name:
        raise ConfigError(f"stage {stage.name!r}: {terms[0].name} from a teacher cache reads the teacher's tokenizer "
                          "(not its weights): set teacher.name to the teacher the cache was captured with")
    teacher_tokenizer = load_tokenizer(config.teacher.name, config.teacher.trust_remote_code)
    lookup, eval_examples = open_paired_cache(config, prep, stage, train_names, tokenizer_hash(teacher_tokenizer))
    shared = shared_vocabulary(prep.tokenizer.get_vocab(), teacher_tokenizer.get_vocab())
    log.info("stage %s: %s across tokenizers from the teacher cache %s (k=%d of %d teacher ids); %d token strings "
             "shared by both vocabularies", stage.name, ", ".join(t.name for t in terms), lookup.cache.path,
             lookup.cache.manifest.k, lookup.cache.manifest.vocab_size, shared[0].numel())
    teacher = CachedCrossVocabTeacher(lookup, {t.name: t.weight for t in terms}, stage.temperature,
                                      config.teacher_cache.tail, shared)
    return teacher, eval_examples
