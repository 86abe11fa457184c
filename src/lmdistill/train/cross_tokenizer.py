"""Logit KD across tokenizers (stage losses `uld` and `cross_vocab_kl`): the teacher reads its own tokenisation of
each conversation, and its logits meet the student's at byte-aligned positions.

Before training, every example of the stage (training sources and eval sets) gets
    teacher_input_ids   the same conversation rendered with the teacher's chat template and tokenised by the
                        teacher's tokenizer (as `lmdistill generate` prompts it);
    pairs               [(student position, teacher position)]: the last token of every aligned span on both sides
                        (lmdistill.data.align), where both have read the same content, kept when the student's label
                        mask counts the student's next token.
During training, `CrossVocabTeacher.terms` runs the teacher on teacher_input_ids and scores the student's logits
against the teacher's at the pairs. Each term is a sum over pairs divided by the student's counted tokens (the
`num_items` of the other logit terms), so accumulation behaves alike and an unpaired counted token counts zero.

Plain text rows (no conversation) and rows whose chat template rewrites a message get no pairs: they train on the
stage's other terms only (their number is logged).

`lmdistill cache-teacher` builds the same teacher view (`teacher_views`) and stores the teacher's top-k at the
pairs, so that a stage with teacher_source: cache needs no teacher (train/cross_cache.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from lmdistill.config import CrossVocabTerm, PipelineConfig, StageSettings
from lmdistill.data.align import Range, align, boundary_pairs, token_ranges
from lmdistill.data.collate import CrossTokenizerCollator
from lmdistill.data.render import render_causal
from lmdistill.data.tokenize import IGNORE_INDEX
from lmdistill.errors import ConfigError
from lmdistill.losses.cross_vocab import cross_vocab_kl, shared_vocabulary, uld
from lmdistill.losses.fused import LMHead
from lmdistill.teacher.retokenize import teacher_sources
from lmdistill.train.heads import head_inputs, logit_scale, output_layer, softcap

log = logging.getLogger(__name__)


def _rendered(tokenizer, messages: list[dict]) -> tuple[list[int], list[Range]]:
    """Token ids of the conversation as the data pipeline tokenises it (prompt and response separately) and the
    content byte range of each token."""
    prompt, response = render_causal(messages, tokenizer)
    parts = [tokenizer(text, return_offsets_mapping=True, add_special_tokens=False) for text in (prompt, response)]
    offsets = parts[0].offset_mapping + [(a + len(prompt), b + len(prompt)) for a, b in parts[1].offset_mapping]
    return parts[0].input_ids + parts[1].input_ids, token_ranges(offsets, prompt + response,
                                                                 [m["content"] for m in messages])


def _placed(example_ids: list[int], ids: list[int], ranges: list[Range], eos: int) -> list[Range] | None:
    """Ranges for an example's tokens from a rendering of its conversation: the example ends with the rendering
    (its prompt perhaps cut from the left) and perhaps an eos appended after it; tokens in front of the matched part
    (a BOS) are zero-width where it starts, an appended eos zero-width at the end. None when nothing matches."""
    appended = bool(example_ids) and example_ids[-1] == eos and (not ids or ids[-1] != eos)
    core = example_ids[:-1] if appended else example_ids
    tail = 0
    while tail < min(len(core), len(ids)) and core[-1 - tail] == ids[-1 - tail]:
        tail += 1
    if tail == 0:
        return None
    matched = ranges[len(ranges) - tail:]
    end = [(matched[-1][1], matched[-1][1])] if appended else []
    return [(matched[0][0], matched[0][0])] * (len(core) - tail) + matched + end


def example_pairs(student: dict, teacher: dict, messages: list[dict], student_tokenizer,
                  teacher_tokenizer) -> list[tuple[int, int]]:
    """(student position, teacher position) pairs of one example (see the module docstring)."""
    try:
        sides = [_placed(ex["input_ids"], *_rendered(tok, messages), tok.eos_token_id)
                 for ex, tok in ((student, student_tokenizer), (teacher, teacher_tokenizer))]
    except ValueError:
        return []  # the chat template rewrites a message: no common content to align on
    if sides[0] is None or sides[1] is None:
        return []
    labels = student["labels"]
    return [(s, t) for s, t in boundary_pairs(align(sides[0], sides[1]))
            if s + 1 < len(labels) and labels[s + 1] != IGNORE_INDEX]


def with_teacher_view(examples: list[dict], teacher_view: list[dict], student_tokenizer,
                      teacher_tokenizer) -> tuple[list[dict], int]:
    """`examples` with teacher_input_ids and pairs added (matched to the teacher's examples by row_id); also the
    number of examples left without pairs."""
    by_row = {ex["row_id"]: ex for ex in teacher_view}
    out, unpaired = [], 0
    fallback = [teacher_tokenizer.eos_token_id]
    for ex in examples:
        view = by_row.get(ex["row_id"])
        pairs = example_pairs(ex, view, view["messages"] + [{"role": "assistant", "content": view["answer"]}],
                              student_tokenizer, teacher_tokenizer) if view else []
        unpaired += not pairs
        out.append({**ex, "teacher_input_ids": view["input_ids"] if view else fallback, "pairs": pairs})
    return out, unpaired


@dataclass
class CrossVocabTeacher:
    """The teacher of a cross-vocabulary stage: its forward on its own tokens, and the uld / cross_vocab_kl terms."""

    teacher: torch.nn.Module
    weights: dict[str, float]
    temperature: float
    shared: tuple[Tensor, Tensor]  # (student ids, teacher ids) of the token strings both vocabularies hold

    def terms(self, student_logits: Tensor, inputs: dict[str, Tensor], num_items) -> dict[str, Tensor]:
        """Each term's sum over the batch's pairs divided by num_items (counted tokens; this batch's pairs when
        None). student_logits [B, T, V_s], unshifted: a pair's student position predicts the next token."""
        pairs = inputs["pairs"]
        rows, cols = (pairs[..., 0] >= 0).nonzero(as_tuple=True)
        device = next(self.teacher.parameters()).device
        with torch.no_grad():
            # The teacher's logits only at the paired rows: its [B, T', V] logits never exist.
            with head_inputs(self.teacher) as captured:
                self.teacher(input_ids=inputs["teacher_input_ids"].to(device),
                             attention_mask=inputs["teacher_attention_mask"].to(device))
            hidden = captured[-1][rows.to(device), pairs[rows, cols, 1].to(device)]
            head = output_layer(self.teacher)
            t_rows = LMHead(head.weight, head.bias, softcap(self.teacher), logit_scale(self.teacher)).logits(
                head(hidden)).to(student_logits.device)
        s_rows = student_logits[rows, pairs[rows, cols, 0]]
        denom = max(float(num_items if num_items is not None else len(rows)), 1.0)
        out = {}
        for name in self.weights:
            if name == "uld":
                out[name] = uld(s_rows, t_rows, self.temperature) / denom
            else:
                out[name] = cross_vocab_kl(s_rows, t_rows, *self.shared, temperature=self.temperature) / denom
        return out


def teacher_views(config: PipelineConfig, prep, teacher_tokenizer, sources: dict[str, list[dict]],
                  who: str) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """The training `sources` and the run's eval sets with the teacher's view added (teacher_input_ids, pairs); `who`
    needs them (for the log and errors)."""
    if prep.task_type != "causal":
        raise ConfigError(f"{who} needs a causal teacher and student (it aligns their chat renderings); use "
                          "sequence-level KD for encoder-decoder models")
    # An eval set not in data.eval was held out of the training source of its name (data.eval_holdout).
    held_out = [name for name in prep.eval_sets if name not in config.data.eval]
    views = teacher_sources(config, teacher_tokenizer, prep.task_type, list(dict.fromkeys([*sources, *held_out])))
    eval_views = teacher_sources(config, teacher_tokenizer, prep.task_type,
                                 [name for name in prep.eval_sets if name in config.data.eval], group="eval")
    eval_views |= {name: views[name] for name in held_out}
    unpaired = 0
    out = ({}, {})
    for target, given, viewed in ((out[0], sources, views), (out[1], prep.eval_sets, eval_views)):
        for name, examples in given.items():
            target[name], missing = with_teacher_view(examples, viewed[name], prep.tokenizer, teacher_tokenizer)
            unpaired += missing
    if unpaired:
        log.warning("%s: %d examples have no position aligned with the teacher's tokens (plain text rows, or a chat "
                    "template that rewrites a message); they train on the other terms only", who, unpaired)
    return out


def cross_vocab_stage(config: PipelineConfig, prep, stage: StageSettings, sources: dict[str, list[dict]],
                      eval_examples: list[dict]):
    """For a stage with uld / cross_vocab_kl terms and a live teacher: (sources and eval examples with the teacher's
    view added, their collator, the CrossVocabTeacher). None when the stage has no such term, or reads them from a
    teacher cache (train/cross_cache.py)."""
    terms = [t for t in stage.losses if isinstance(t, CrossVocabTerm)]
    if not terms or stage.teacher_source == "cache":
        return None
    if prep.teacher is None:
        raise ConfigError(f"stage {stage.name!r}: {terms[0].name} runs the teacher, but this run loaded none; set "
                          "teacher.name")
    teacher_tokenizer = prep.teacher_tokenizer or prep.tokenizer
    out_sources, out_eval = teacher_views(config, prep, teacher_tokenizer, sources,
                                          f"stage {stage.name!r}: {terms[0].name}")
    shared = shared_vocabulary(prep.tokenizer.get_vocab(), teacher_tokenizer.get_vocab())
    log.info("stage %s: %s across tokenizers; %d token strings shared by both vocabularies", stage.name,
             ", ".join(t.name for t in terms), shared[0].numel())
    teacher = CrossVocabTeacher(prep.teacher, {t.name: t.weight for t in terms}, stage.temperature, shared)
    collator = CrossTokenizerCollator(prep.tokenizer.pad_token_id, teacher_tokenizer.pad_token_id)
    return out_sources, [ex for rows in out_eval.values() for ex in rows] if eval_examples else [], collator, teacher
