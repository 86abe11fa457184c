"""Quality metrics of a model on encoded examples and on generations.

Encoded examples are the data layer's dicts: `input_ids: list[int]`, `labels: list[int]` (not shifted; -100 is
not counted), `prompt_length: int`, `source: str`. For causal models the logits at position t score token t+1
(the shift happens here, once). For encoder-decoder models `input_ids` feed the encoder and `labels` are the
decoder targets, aligned with the decoder logits.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from lmdistill.config import GenerationSettings
from lmdistill.data.completion import special_prefix
from lmdistill.errors import DataError, ModelError
from lmdistill.teacher.sampling import generate_kwargs

IGNORE_INDEX = -100
# Elements of one float32 [tokens, vocab] chunk: 2**26 floats = 256 MB, so a 150k vocab is upcast ~440 tokens at
# a time instead of every counted token of a batch at once.
_CHUNK_ELEMENTS = 2**26
_CJK_RANGES = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
# One token per CJK character, else a run of other word characters, in text order.
_ROUGE_TOKEN = re.compile(f"[{_CJK_RANGES}]|[^\\W{_CJK_RANGES}]+")
# Trailing punctuation ignored by exact match, including the full-width forms used in Chinese text.
_TRAILING_PUNCT = string.punctuation + "。！？，；：、…"


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put `model` in eval mode (no dropout) for the block and restore its previous mode after: metrics and
    samples run in the middle of training."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _is_encoder_decoder(model: torch.nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _check_examples(examples: Sequence[dict]) -> None:
    for i, ex in enumerate(examples):
        for key in ("input_ids", "labels"):
            if key not in ex:
                raise DataError(f"eval example {i} has no '{key}' (keys: {sorted(ex)}); pass examples encoded by "
                                f"lmdistill.data (input_ids, labels, prompt_length, source)")


def _pad_right(seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """[B] lists of ids -> [B, L] tensor, right-padded with `value` to the longest."""
    width = max(len(s) for s in seqs)
    return torch.tensor([list(s) + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def counted_logits(model: torch.nn.Module, batch: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `model` on a batch of encoded examples and keep the positions that are counted.

    Returns (logits [N, V] in the model's dtype, targets [N]) where N is the number of labels != -100 in the
    batch and logits[n] is the prediction for targets[n] (causal shift applied for decoder-only models).
    """
    device = next(model.parameters()).device
    input_ids = _pad_right([ex["input_ids"] for ex in batch], 0).to(device)
    attention_mask = _pad_right([[1] * len(ex["input_ids"]) for ex in batch], 0).to(device)
    labels = _pad_right([ex["labels"] for ex in batch], IGNORE_INDEX).to(device)
    if _is_encoder_decoder(model):
        decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       decoder_input_ids=decoder_input_ids).logits  # [B, Lt, V]
        targets = labels  # [B, Lt]
    else:
        if input_ids.shape != labels.shape:
            raise DataError(f"causal eval examples need labels as long as input_ids (got {tuple(labels.shape)} "
                            f"vs {tuple(input_ids.shape)}); encode them with lmdistill.data")
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]  # [B, L-1, V]
        targets = labels[:, 1:]  # [B, L-1]
    mask = targets != IGNORE_INDEX
    return logits[mask], targets[mask]


def _batches(examples: Sequence[dict], batch_size: int) -> Iterator[Sequence[dict]]:
    for start in range(0, len(examples), batch_size):
        yield examples[start:start + batch_size]


def _token_chunks(num_tokens: int, vocab: int) -> Iterator[slice]:
    """Row slices of a [num_tokens, vocab] logits matrix, each small enough to upcast to float32."""
    step = max(1, _CHUNK_ELEMENTS // vocab)
    for start in range(0, num_tokens, step):
        yield slice(start, start + step)


def perplexity(model: torch.nn.Module, examples: Sequence[dict], batch_size: int = 8) -> float:
    """exp(mean negative log-likelihood per counted token) over all `examples` (mean over tokens, not over
    sequences, so padding and batch size do not change the value)."""
    _check_examples(examples)
    total_nll, count = 0.0, 0
    # no_grad rather than inference_mode here and below: a sharded (FSDP2) model refills its gather buffers in place
    # on later passes, which tensors created under inference_mode forbid.
    with eval_mode(model), torch.no_grad():
        for batch in _batches(examples, batch_size):
            logits, targets = counted_logits(model, batch)  # [N, V], [N]
            for rows in _token_chunks(targets.numel(), logits.shape[-1]):
                total_nll += F.cross_entropy(logits[rows].float(), targets[rows], reduction="sum").item()
            count += targets.numel()
    if count == 0:
        raise DataError("no counted tokens in the eval set (every label is -100): check the prompt masking and "
                        "max_length of the eval data")
    return float(torch.tensor(total_nll / count, dtype=torch.float64).exp())


def agreement_and_kl(teacher: torch.nn.Module, student: torch.nn.Module, examples: Sequence[dict],
                     batch_size: int = 8) -> dict[str, float]:
    """Top-1 agreement and mean KL(teacher || student) at T=1 over the counted tokens of `examples`.

    When the two vocabularies differ only by padding rows (e.g. Qwen checkpoints of different sizes), the
    comparison uses the shared first min(V_teacher, V_student) ids, which hold every real token.
    Returns {"top1_agreement": fraction in [0, 1], "kl_teacher_student": nats per token}.
    """
    _check_examples(examples)
    agree, kl_sum, count = 0, 0.0, 0
    with eval_mode(teacher), eval_mode(student), torch.no_grad():
        for batch in _batches(examples, batch_size):
            t_logits, targets = counted_logits(teacher, batch)  # [N, Vt], [N]
            s_logits, _ = counted_logits(student, batch)  # [N, Vs]
            vocab = min(t_logits.shape[-1], s_logits.shape[-1])
            s_logits = s_logits.to(t_logits.device)
            for rows in _token_chunks(targets.numel(), vocab):
                log_p = F.log_softmax(t_logits[rows, :vocab].float(), dim=-1)  # [n, V]
                log_q = F.log_softmax(s_logits[rows, :vocab].float(), dim=-1)  # [n, V]
                kl_sum += (log_p.exp() * (log_p - log_q)).sum().item()
                agree += (log_p.argmax(-1) == log_q.argmax(-1)).sum().item()
            count += targets.numel()
    if count == 0:
        raise DataError("no counted tokens in the eval set (every label is -100): check the prompt masking and "
                        "max_length of the eval data")
    return {"top1_agreement": agree / count, "kl_teacher_student": kl_sum / count}


class _RougeTokenizer:
    """Lower-cased word tokens, with each CJK character its own token: rouge_score's default tokenizer keeps
    only [a-z0-9] and would score any Chinese text (seed 001's medical domain) as empty."""

    def tokenize(self, text: str) -> list[str]:
        return _ROUGE_TOKEN.findall(text.lower())


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise DataError(f"{len(predictions)} predictions but {len(references)} references: give one reference "
                        f"per generation prompt")
    if not references:
        raise DataError("no references to score generations against: give at least one prompt with a reference")


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 of each prediction against its reference (rouge_score, LCS over word tokens)."""
    from rouge_score.rouge_scorer import RougeScorer

    _check_pairs(predictions, references)
    scorer = RougeScorer(["rougeL"], tokenizer=_RougeTokenizer())
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    return sum(scores) / len(scores)


def normalize_answer(text: str) -> str:
    """Case-folded, whitespace collapsed, trailing punctuation removed."""
    return " ".join(text.casefold().split()).rstrip(_TRAILING_PUNCT).rstrip()


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after `normalize_answer`."""
    _check_pairs(predictions, references)
    hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
    return hits / len(references)


def _prompt_ids(tokenizer, prompt: str | Sequence[int], index: int, lead: list[int]) -> list[int]:
    """A prompt's ids: token ids as given; a text tokenised with the tokenizer's defaults, its leading ids (`lead`:
    the BOS it puts in front, see special_prefix) once, even when a chat template already wrote them (Llama 3's)."""
    ids = tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
    if isinstance(prompt, str) and lead and ids[len(lead):2 * len(lead)] == lead:
        ids = ids[len(lead):]
    if not ids:
        raise DataError(f"generation prompt {index} is empty: every prompt needs at least one token")
    return ids


def generate_continuations(model: torch.nn.Module, tokenizer, prompts: Sequence[str] | Sequence[Sequence[int]],
                           max_new_tokens: int = 64, batch_size: int = 8) -> list[str]:
    """Greedy generations for `prompts` (texts, tokenized with the tokenizer's defaults, or token ids), in
    batches left-padded so that every prompt ends where generation starts.

    Returns the decoded continuation only (special tokens dropped), never the prompt, one string per prompt.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ModelError("the tokenizer has neither a pad nor an eos token: set tokenizer.pad_token before "
                         "generating")
    encoder_decoder = _is_encoder_decoder(model)
    device = next(model.parameters()).device
    lead = special_prefix(tokenizer) if any(isinstance(p, str) for p in prompts) else []
    all_ids = [_prompt_ids(tokenizer, p, i, lead) for i, p in enumerate(prompts)]
    outputs: list[str] = []
    greedy = generate_kwargs(GenerationSettings(do_sample=False, max_new_tokens=max_new_tokens))
    with eval_mode(model), torch.no_grad():
        for batch in _batches(all_ids, batch_size):
            width = max(len(ids) for ids in batch)
            input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch], device=device)
            attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch],
                                          device=device)
            # Plain greedy decoding: a checkpoint's generation_config may ask for sampling or penalties.
            generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, **greedy,
                                       pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
            new_tokens = generated if encoder_decoder else generated[:, width:]  # [B, <= max_new_tokens]
            outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return outputs
