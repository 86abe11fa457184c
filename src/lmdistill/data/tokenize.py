"""Tokenise normalised rows into training examples with label masks.

Causal examples: input_ids = prompt + response (+ eos); labels = input_ids with -100 on every prompt and
template token (labels are not shifted: the trainer shifts once). Text rows train on every token. A bos
token is put in front of plain-template and text rows when the tokenizer has one distinct from eos (chat
templates write their own). eos is appended after the response, after the end-of-turn token when a chat
template has one, so a model stops under default generation settings.

Truncation policy (max_length L), which keeps the response where possible:
  * text: cut to the first L tokens (no eos then, since the text did not end);
  * prompt/response and chat: when prompt + response > L, the prompt is cut from the left (its end, with the
    question and the assistant header, is kept) but never below min(prompt, L // 4) tokens; a response that
    still does not fit makes the row `too_long` (skipped and counted, or fatal with strict);
  * seq2seq: the source is cut to L tokens (eos kept last); a target longer than L is `too_long`.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rich.progress import track

from lmdistill.data.badrows import BadRows
from lmdistill.data.render import plain_history, render_causal, to_messages
from lmdistill.errors import DataError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
TASK_TYPES = ("causal", "seq2seq")
_CHUNK = 512  # rows per batched tokenizer call
_PROGRESS_FROM = 2000  # show a progress bar from this many rows on


@dataclass
class EncodedSource:
    """Tokenised examples of one source and the rows skipped while tokenising."""

    examples: list[dict]
    skipped: Counter = field(default_factory=Counter)
    first_skipped: list[str] = field(default_factory=list)


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Check the special tokens the data needs; a missing pad token is set to eos (with a warning)."""
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {tokenizer.name_or_path or '(unnamed)'} has no eos token: examples need one "
                        f"to end. Set tokenizer.eos_token (e.g. in its tokenizer_config.json).")
    if tokenizer.pad_token_id is None:
        logger.warning("tokenizer %s has no pad token; using its eos token %r (id %d) for padding",
                       tokenizer.name_or_path or "(unnamed)", tokenizer.eos_token, tokenizer.eos_token_id)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _ids(tokenizer: Any, texts: list[str], description: str) -> list[list[int]]:
    """Batched tokenisation without special tokens; a progress bar for large sources."""
    chunks = [texts[i:i + _CHUNK] for i in range(0, len(texts), _CHUNK)]
    out: list[list[int]] = []
    for chunk in track(chunks, description=description, disable=len(texts) < _PROGRESS_FROM, transient=True):
        out.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"] if chunk else [])
    return out


def _prefix(tokenizer: Any) -> list[int]:
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and bos != tokenizer.eos_token_id else []


def _causal_pair(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]] | str:
    """Apply the truncation policy; returns (prompt, response) ids or the reason the row does not fit."""
    if len(prompt) + len(response) <= max_length:
        return prompt, response
    floor = min(len(prompt), max_length // 4)
    if len(response) > max_length - floor:
        return (f"prompt {len(prompt)} + response {len(response)} tokens exceed max_length {max_length} even with "
                f"the prompt cut to {floor} tokens; raise max_length or shorten the response")
    return prompt[len(prompt) + len(response) - max_length:], response


def _encode_causal(rows: list[dict], tokenizer: Any, max_length: int, bad: BadRows, name: str) -> list[dict]:
    eos, prefix = tokenizer.eos_token_id, _prefix(tokenizer)
    templated = bool(getattr(tokenizer, "chat_template", None))
    pairs: list[tuple[dict, str, str]] = []
    for row in track(rows, description=f"rendering {name}", disable=len(rows) < _PROGRESS_FROM, transient=True):
        if "text" in row:  # a text row is all "response": every token is trained on
            pairs.append((row, "", row["text"]))
            continue
        try:
            prompt, response = render_causal(to_messages(row), tokenizer)
        except ValueError as e:
            bad.add("bad_chat", f"row {row['row_id']}", str(e))
            continue
        pairs.append((row, prompt, response))
    prompts = _ids(tokenizer, [p for _, p, _ in pairs], f"tokenising {name} prompts")
    responses = _ids(tokenizer, [r for _, _, r in pairs], f"tokenising {name}")
    examples = []
    for (row, _, _), prompt_ids, response_ids in zip(pairs, prompts, responses):
        if "text" in row:
            ids = (prefix + response_ids + [eos])[:max_length]
            head = len(prefix)
        else:
            lead = [] if templated else prefix  # kept in front even when the prompt is cut
            tail_ids = response_ids if response_ids[-1:] == [eos] else response_ids + [eos]
            fitted = _causal_pair(prompt_ids, tail_ids, max_length - len(lead))
            if isinstance(fitted, str):
                bad.add("too_long", f"row {row['row_id']}", fitted)
                continue
            ids, head = lead + fitted[0] + fitted[1], len(lead) + len(fitted[0])
        labels = [IGNORE_INDEX] * head + ids[head:]
        examples.append({"input_ids": ids, "labels": labels, "prompt_length": head, "source": name,
                         "row_id": row["row_id"], "bucket": row.get("bucket")})
    return examples


def _encode_seq2seq(rows: list[dict], tokenizer: Any, max_length: int, bad: BadRows, name: str) -> list[dict]:
    if any("text" in row for row in rows):
        raise DataError(f"source '{name}' holds plain text rows, which have no target: seq2seq training needs "
                        f"source/target, prompt/response or chat rows. Use task_type 'causal' for plain text.")
    eos = tokenizer.eos_token_id
    messages = [to_messages(row) for row in rows]
    sources = [m[0]["content"] if len(m) == 2 and m[0]["role"] == "user" else plain_history(m[:-1]).rstrip()
               for m in messages]
    source_ids = _ids(tokenizer, sources, f"tokenising {name} sources")
    target_ids = _ids(tokenizer, [m[-1]["content"] for m in messages], f"tokenising {name} targets")
    examples = []
    for row, src, tgt in zip(rows, source_ids, target_ids):
        if len(tgt) + 1 > max_length:
            bad.add("too_long", f"row {row['row_id']}", f"target of {len(tgt) + 1} tokens exceeds max_length "
                                                        f"{max_length}; raise max_length or shorten the target")
            continue
        examples.append({"input_ids": src[:max_length - 1] + [eos], "labels": tgt + [eos], "source": name,
                         "row_id": row["row_id"], "bucket": row.get("bucket")})
    return examples


def encode_rows(rows: list[dict], tokenizer: Any, max_length: int = 512, task_type: str = "causal",
                strict: bool = False, source_name: str = "general") -> EncodedSource:
    """Tokenise normalised rows (see formats.py) into examples; see the module docstring for the layout.

    Rows that cannot be used (chat the template rejects, too long after truncation) are counted and skipped,
    or raise a DataError naming the row when `strict`. Raises DataError when no example is left.
    """
    if task_type not in TASK_TYPES:
        raise DataError(f"unknown task_type '{task_type}': use one of {', '.join(TASK_TYPES)}.")
    if max_length < 2:
        raise DataError(f"max_length must be at least 2 tokens, got {max_length}.")
    prepare_tokenizer(tokenizer)
    bad = BadRows(f"source '{source_name}'", strict)
    encode = _encode_causal if task_type == "causal" else _encode_seq2seq
    examples = encode(rows, tokenizer, max_length, bad, source_name)
    bad.log_summary(len(examples))
    bad.fail_if_nothing_kept(len(examples), "examples")
    return EncodedSource(examples, bad.skipped, bad.first)
