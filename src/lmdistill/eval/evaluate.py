"""Evaluate several models (roles such as teacher, student_before, student_after, baseline) on the same data
and keep the numbers in RUN_DIR/metrics.json for the report.

metrics.json maps role -> flat metrics, keys with a slash where a metric has a qualifier:
  perplexity/<eval set>, top1_agreement/<eval set>, kl_teacher_student/<eval set>
      (top-1 agreement with the teacher, and KL(teacher || student) in nats per token, at T=1)
  rouge_l, exact_match                  (greedy answers to the eval prompts vs the reference answers)
  rouge_l_continuation                  (plain-text eval sets: greedy continuations of the first part of each
                                         held-out text vs the rest of it)
  params, memory_mb, disk_mb, tokens_per_s/batch1, tokens_per_s/batch8   (size and speed)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from lmdistill.errors import LmdistillError
from lmdistill.data.completion import text_prompt_length
from lmdistill.eval.metrics import IGNORE_INDEX, agreement_and_kl, exact_match, generate_continuations, perplexity, rouge_l
from lmdistill.eval.speed import size_and_speed

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
# The roles the report knows, in the order its table shows them; any other role follows these.
KNOWN_ROLES = ("teacher", "student_before", "student_after", "baseline")
# References of at most this many words are short answers, for which exact match means something.
SHORT_ANSWER_WORDS = 8
# What a generation prompt asks for: an answer to an eval prompt, or the continuation of a held-out text prefix.
ANSWER, CONTINUATION = "answer", "continuation"
_SPEED_PROMPT_TOKENS = 32
# Prompts generation is timed on: enough for a stable tokens/s (8 x 32 tokens at batch 1, one batch of 8). Timing every
# generation prompt made the speed rows the costliest part of an evaluation (150 prompts: ~5,000 forward passes).
_SPEED_PROMPTS = 8


def prompts_and_references(examples: Sequence[dict], tokenizer, encoder_decoder: bool = False,
                           limit: int | None = None) -> tuple[list[list[int]], list[str]]:
    """Generation prompts and their reference answers taken from encoded eval examples.

    Causal examples give their prompt tokens (input_ids[:prompt_length]) and the text of their counted labels;
    examples without a prompt (plain text, prompt_length 0) are skipped, as there is nothing to answer. For
    encoder-decoder models the prompt is the encoder input and the reference the decoder labels.
    Returns (prompt token ids, reference texts) for at most `limit` examples, in order.
    """
    prompts, references = [], []
    for ex in examples:
        if limit is not None and len(prompts) >= limit:
            break
        if encoder_decoder:
            prompt = list(ex["input_ids"])
        elif ex.get("prompt_length"):
            prompt = list(ex["input_ids"][:ex["prompt_length"]])
        else:
            continue
        prompts.append(prompt)
        answer = [t for t in ex["labels"] if t != IGNORE_INDEX]
        references.append(tokenizer.decode(answer, skip_special_tokens=True).strip())
    return prompts, references


def continuation_prompts(examples: Sequence[dict], tokenizer, fraction: float, tokens: int | None = None,
                         limit: int | None = None) -> tuple[list[list[int]], list[str]]:
    """Held-out prefixes of plain-text eval examples (those with "text_tokens"; see data/completion.py for the
    split) and the rest of each text as the reference its continuation is scored against."""
    prompts, references = [], []
    for ex in examples:
        if limit is not None and len(prompts) >= limit:
            break
        if "text_tokens" not in ex:
            continue
        cut, end = text_prompt_length(ex, fraction, tokens), ex["prompt_length"] + ex["text_tokens"]
        prompts.append(list(ex["input_ids"][:cut]))
        references.append(tokenizer.decode(ex["input_ids"][cut:end], skip_special_tokens=True).strip())
    return prompts, references


def _generation_scores(predictions: Sequence[str], references: Sequence[str], modes: Sequence[str],
                       score_exact_match: bool | None) -> dict[str, float]:
    """ROUGE-L (and exact match) of the answers, ROUGE-L of the continuations, each over its own prompts."""
    scores = {}
    for mode, key in ((ANSWER, "rouge_l"), (CONTINUATION, "rouge_l_continuation")):
        chosen = [i for i, m in enumerate(modes) if m == mode]
        if not chosen:
            continue
        preds, refs = [predictions[i] for i in chosen], [references[i] for i in chosen]
        scores[key] = rouge_l(preds, refs)
        if mode == ANSWER and (score_exact_match if score_exact_match is not None
                               else all(len(r.split()) <= SHORT_ANSWER_WORDS for r in refs)):
            scores["exact_match"] = exact_match(preds, refs)
    return scores


def _speed_prompts(tokenizer, generation_prompts: Sequence | None,
                   eval_sets: Mapping[str, Sequence[dict]]) -> list[list[int]]:
    """Token ids used to time generation: the first 8 generation prompts, else the prompt part of up to 8 eval
    examples (their first tokens when an example has no prompt)."""
    if generation_prompts:
        return [tokenizer(p)["input_ids"] if isinstance(p, str) else list(p)
                for p in generation_prompts[:_SPEED_PROMPTS]]
    for examples in eval_sets.values():
        return [list(ex["input_ids"][:ex.get("prompt_length") or _SPEED_PROMPT_TOKENS])
                for ex in examples[:_SPEED_PROMPTS]]
    return []


def evaluate_models(models: Mapping[str, torch.nn.Module], tokenizer, eval_sets: Mapping[str, Sequence[dict]],
                    teacher: torch.nn.Module | None = None, generation_prompts: Sequence | None = None,
                    references: Sequence[str] | None = None, *, model_dirs: Mapping[str, str | Path] | None = None,
                    batch_size: int = 8, max_new_tokens: int = 64, score_exact_match: bool | None = None,
                    measure_speed: bool = True, speed_new_tokens: int = 32,
                    modes: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Every metric for every model role.

    models: role -> model; `teacher` (which may also be one of `models`) is the reference for top-1 agreement
    and KL, computed for every other model. eval_sets: name -> encoded examples. generation_prompts (texts or
    token ids) are answered greedily with up to `max_new_tokens`; with `references` (one per prompt) they are
    scored by ROUGE-L, and by exact match when `score_exact_match` is True or, when None, when every reference
    has at most SHORT_ANSWER_WORDS words. `modes` (one per prompt, default all ANSWER) marks CONTINUATION prompts
    (held-out text prefixes), scored apart as rouge_l_continuation. model_dirs: role -> saved folder, for the size
    on disk.
    Returns role -> {metric: value} (see the module docstring for the keys).
    """
    if references is not None and generation_prompts is None:
        raise LmdistillError("references given without generation prompts: pass the prompts they answer")
    if references is not None and len(references) != len(generation_prompts):
        raise LmdistillError(f"{len(generation_prompts)} generation prompts but {len(references)} references: give "
                             "one reference per prompt")
    speed_prompts = _speed_prompts(tokenizer, generation_prompts, eval_sets) if measure_speed else []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    results: dict[str, dict[str, float]] = {}
    for role, model in models.items():
        logger.info("evaluating %s", role)
        row = size_and_speed(model, speed_prompts, folder=(model_dirs or {}).get(role),
                             max_new_tokens=speed_new_tokens, pad_token_id=pad_id)
        for name, examples in eval_sets.items():
            logger.info("%s: scoring %d examples of eval set %s", role, len(examples), name)
            row[f"perplexity/{name}"] = perplexity(model, examples, batch_size)
            if teacher is not None and model is not teacher:
                scores = agreement_and_kl(teacher, model, examples, batch_size)
                row[f"top1_agreement/{name}"] = scores["top1_agreement"]
                row[f"kl_teacher_student/{name}"] = scores["kl_teacher_student"]
        if generation_prompts:
            predictions = generate_continuations(model, tokenizer, generation_prompts, max_new_tokens, batch_size)
            if references is not None:
                row.update(_generation_scores(predictions, references, modes or [ANSWER] * len(references),
                                              score_exact_match))
        logger.info("%s: %s", role, ", ".join(f"{k}={v:.4g}" for k, v in row.items()))
        results[role] = row
    return results


def read_metrics(run_dir: str | Path, file_name: str = METRICS_FILE) -> dict[str, dict[str, float]]:
    """RUN_DIR/metrics.json (or another file of the same form) as role -> metrics; {} when there is none yet."""
    path = Path(run_dir) / file_name
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise LmdistillError(f"{path} is not valid JSON ({err}): delete it and run `lmdistill eval` again") from err
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise LmdistillError(f"{path} should map each model role to its metrics: delete it and run "
                             f"`lmdistill eval` again")
    return data


def write_metrics(run_dir: str | Path, metrics: Mapping[str, Mapping[str, float]], merge: bool = True,
                  file_name: str = METRICS_FILE) -> Path:
    """Write role -> metrics to RUN_DIR/metrics.json (or `file_name`) atomically (temp file + rename). With `merge`,
    roles already in the file and not in `metrics` are kept, so evaluations after each stage accumulate."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = read_metrics(run_dir, file_name) if merge else {}
    data.update({role: dict(values) for role, values in metrics.items()})
    path = run_dir / file_name
    tmp = path.with_name(f".{file_name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path
