"""Tokenise normalised rows into training examples with label masks.

Causal examples: input_ids = the rendered training text (see render.py) + eos; labels = input_ids with -100
on every token that is not trained on: prompts, template tokens, tool results, and assistant turns that
`train_on` leaves out (labels are not shifted: the trainer shifts once). Text rows train on every token (their
examples say how many text tokens they hold, "text_tokens"). A bos token is put in front of plain-template and
text rows when the tokenizer has one distinct from eos (chat templates write their own; the completion layout,
completion.py, puts what the tokenizer itself adds). eos is appended after the last trained turn, after the
end-of-turn token when a chat template has one, so a model stops under default generation settings; not after
rows marked `finished: false` (generations cut at max_new_tokens). prompt_length counts the tokens before the
last trained turn (what generation continues from). Prompt-only rows give one example with nothing to train
on (every label -100): a prompt for the teacher to answer, its end kept when it is too long (seq2seq: the source,
with one label, -100).

One row may give several examples ("part" 0, 1, ...): the windows of a long text, or one per assistant turn
when a chat template rewrites history. Part 0 keeps the row's row_id; later parts get ids counting up from
past the source's last row, so every example of a source has its own row_id.

Truncation policy (max_length L), which keeps the response where possible:
  * text: a text longer than L is split into consecutive windows of L tokens, each starting `overlap` tokens
    before the previous one ended; those repeated tokens are context (-100), so every token is trained on
    once, and nothing after the first window is lost. The last window ends with eos;
  * prompt/response and chat: when prompt + response > L, the prompt (everything before the last trained turn)
    is cut from the left (its end, with the question and the assistant header, is kept) but never below
    min(prompt, L // 4) tokens; a response that still does not fit makes the row `too_long` (skipped and
    counted, or fatal with strict);
  * seq2seq: the source is cut to L tokens (eos kept last); a target longer than L is `too_long`.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rich.progress import track

from lmdistill.data.badrows import BadRows
from lmdistill.data.completion import completion_parts, has_response, resolve_layout, special_prefix
from lmdistill.data.render import (TRAIN_ON, Segments, plain_body, plain_history, render_prompt, render_segments,
                                   to_messages)
from lmdistill.errors import DataError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
TASK_TYPES = ("causal", "seq2seq")
_CHUNK = 512  # rows per batched tokenizer call
_PROGRESS_FROM = 2000  # show a progress bar from this many rows on
Outcome = list[dict] | tuple[str, str]  # a row's examples, or (bad-row reason, detail)


@dataclass(frozen=True)
class Layout:
    """The options that decide what a row becomes (part of the tokenisation cache key)."""

    max_length: int = 512
    task_type: str = "causal"
    train_on: str = "all_assistant"
    overlap: int = 0
    completion: bool = False  # the completion layout (completion.py) rather than the chat / plain template

    def check(self) -> None:
        if self.task_type not in TASK_TYPES:
            raise DataError(f"unknown task_type '{self.task_type}': use one of {', '.join(TASK_TYPES)}.")
        if self.max_length < 2:
            raise DataError(f"max_length must be at least 2 tokens, got {self.max_length}.")
        if self.train_on not in TRAIN_ON:
            raise DataError(f"data.train_on '{self.train_on}' is unknown: use one of {', '.join(TRAIN_ON)}.")
        if not 0 <= self.overlap <= self.max_length // 2:
            raise DataError(f"data.text_overlap {self.overlap} must be between 0 and max_length / 2 "
                            f"({self.max_length // 2}) so that each window moves forward.")


@dataclass
class EncodedSource:
    """Tokenised examples of one source and the rows skipped while tokenising."""

    examples: list[dict]
    skipped: Counter = field(default_factory=Counter)
    first_skipped: list[str] = field(default_factory=list)
    windows: int = 0  # examples that are windows of split long texts
    split_rows: int = 0  # rows that gave more than one example


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


def _windows(row: dict, ids: list[int], prefix: list[int], stop: list[int], layout: Layout) -> list[dict]:
    """A text row as one example, or consecutive windows when it is longer than max_length (`stop`: [eos], or []
    for a text that did not end)."""
    stream, size = prefix + ids + stop, layout.max_length
    starts = [0]
    while starts[-1] + size < len(stream):
        starts.append(starts[-1] + size - layout.overlap)
    examples = []
    for part, start in enumerate(starts):
        window = stream[start:start + size]
        head = len(prefix) if part == 0 else layout.overlap
        text_tokens = len(window) - head - (len(stop) if start + size >= len(stream) else 0)
        examples.append({"input_ids": window, "labels": [IGNORE_INDEX] * head + window[head:], "prompt_length": head,
                         "row_id": row["row_id"], "part": part, "text_tokens": text_tokens})
    return examples


def _prompt_only(row: dict, ids: list[int], lead: list[int], layout: Layout) -> dict:
    """A prompt for the teacher to answer: nothing is trained on, the prompt's end is kept when it is too long."""
    ids = lead + ids[len(lead) - layout.max_length:]
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * len(ids), "prompt_length": len(ids), "row_id": row["row_id"],
            "part": 0}


def _assemble(row: dict, pieces: list[tuple[list[int], bool]], lead: list[int], stop: list[int], layout: Layout,
              part: int) -> dict | str:
    """One causal example from tokenised segments (the last one is the last trained turn), or why it does not fit."""
    prompt = [t for ids, _ in pieces[:-1] for t in ids]
    prompt_labels = [t if trained else IGNORE_INDEX for ids, trained in pieces[:-1] for t in ids]
    response = pieces[-1][0] if stop and pieces[-1][0][-1:] == stop else pieces[-1][0] + stop
    fitted = _causal_pair(prompt, response, layout.max_length - len(lead))
    if isinstance(fitted, str):
        return fitted
    cut = len(prompt) - len(fitted[0])
    labels = [IGNORE_INDEX] * len(lead) + prompt_labels[cut:] + response
    return {"input_ids": lead + fitted[0] + response, "labels": labels, "prompt_length": len(lead) + len(fitted[0]),
            "row_id": row["row_id"], "part": part}


def encode_causal_rows(rows: list[dict], tokenizer: Any, layout: Layout, name: str) -> list[Outcome]:
    """Per row: its examples, or (reason, detail) when it is bad. Rendering and tokenising are batched."""
    eos, prefix = tokenizer.eos_token_id, special_prefix(tokenizer) if layout.completion else _prefix(tokenizer)
    templated = not layout.completion and getattr(tokenizer, "chat_template", None)
    lead = [] if templated else prefix  # kept in front even when the prompt is cut
    renders: list[list[Segments] | tuple[str, str]] = []
    for row in track(rows, description=f"rendering {name}", disable=len(rows) < _PROGRESS_FROM, transient=True):
        if "text" in row:  # a text row is all "response": every token is trained on
            renders.append([[(row["text"], True)]])
            continue
        try:
            if layout.completion:  # verbatim: the prompt, then the completion as written
                prompt, response = completion_parts(row)
                renders.append([[(prompt, False)] + ([(response, True)] if has_response(row) else [])])
            elif not has_response(row):
                renders.append([[(render_prompt(row, tokenizer), False)]])
            else:
                renders.append(render_segments(row, tokenizer, layout.train_on))
        except ValueError as e:
            renders.append(("bad_chat", str(e)))
    texts = [text for r in renders if isinstance(r, list) for segments in r for text, _ in segments]
    flat = iter(_ids(tokenizer, texts, f"tokenising {name}"))
    out: list[Outcome] = []
    for row, render in zip(rows, renders):
        if isinstance(render, tuple):
            out.append(render)
            continue
        pieces = [[(next(flat), trained) for _, trained in segments] for segments in render]
        stop = [eos] if row.get("finished", True) else []  # a generation cut at max_new_tokens did not end
        if "text" in row:
            out.append(_windows(row, pieces[0][0][0], prefix, stop, layout))
            continue
        if not has_response(row):
            out.append([_prompt_only(row, pieces[0][0][0], lead, layout)])
            continue
        examples = [_assemble(row, p, lead, stop, layout, part) for part, p in enumerate(pieces)]
        too_long = next((e for e in examples if isinstance(e, str)), None)
        out.append(("too_long", too_long) if too_long else examples)
    return out


def encode_seq2seq_rows(rows: list[dict], tokenizer: Any, layout: Layout, name: str) -> list[Outcome]:
    """Per row: its example (in a list), or (reason, detail) when it is bad."""
    if any("text" in row for row in rows):
        raise DataError(f"source '{name}' holds plain text rows, which have no target: seq2seq training needs "
                        f"source/target, prompt/response or chat rows. Use task_type 'causal' for plain text.")
    eos, max_length = tokenizer.eos_token_id, layout.max_length
    messages = [to_messages(row) for row in rows]
    sources = [m[0]["content"] if len(m) == 2 and m[0]["role"] == "user"
               else plain_history(m[:-1], row.get("tools")).rstrip() for row, m in zip(rows, messages)]
    source_ids = _ids(tokenizer, sources, f"tokenising {name} sources")
    target_ids = _ids(tokenizer, [plain_body(m[-1]) for m in messages], f"tokenising {name} targets")
    out: list[Outcome] = []
    for row, src, tgt in zip(rows, source_ids, target_ids):
        if len(tgt) + 1 > max_length:
            out.append(("too_long", f"target of {len(tgt) + 1} tokens exceeds max_length {max_length}; raise "
                                    f"max_length or shorten the target"))
            continue
        # A prompt-only row is a source for the teacher to answer, with nothing to train on (not its eos alone).
        labels = tgt + [eos] if has_response(row) else [IGNORE_INDEX]
        out.append([{"input_ids": src[:max_length - 1] + [eos], "labels": labels, "row_id": row["row_id"], "part": 0}])
    return out


def encode_batch(rows: list[dict], tokenizer: Any, layout: Layout, name: str) -> list[Outcome]:
    """Per row: its examples (without source and bucket), or (reason, detail) when it is bad."""
    encode = encode_causal_rows if layout.task_type == "causal" else encode_seq2seq_rows
    return encode(rows, tokenizer, layout, name)


def number_parts(examples: list[dict], first_free: int) -> int:
    """Give parts after the first their own row_id, counting up from `first_free`; returns the next free id."""
    for example in examples:
        if example["part"]:
            example["row_id"] = first_free
            first_free += 1
    return first_free


def collect(rows: list[dict], outcomes: list[Outcome], bad: BadRows, name: str) -> EncodedSource:
    """Examples with source, bucket and unique row_ids, and the bad rows counted (or raised in strict mode)."""
    examples, windows, split = [], 0, 0
    for row, outcome in zip(rows, outcomes):
        if isinstance(outcome, tuple):
            bad.add(outcome[0], f"row {row['row_id']}", outcome[1])
            continue
        split += len(outcome) > 1
        windows += len(outcome) if len(outcome) > 1 and "text" in row else 0
        bucket = row.get("bucket")
        examples.extend(e | {"source": name, "bucket": bucket} for e in outcome)
    number_parts(examples, max((r["row_id"] for r in rows), default=-1) + 1)
    bad.log_summary(len(examples))
    bad.fail_if_nothing_kept(len(examples), "examples")
    return EncodedSource(examples, bad.skipped, bad.first, windows, split)


def encode_rows(rows: list[dict], tokenizer: Any, max_length: int = 512, task_type: str = "causal",
                strict: bool = False, source_name: str = "general", train_on: str = "all_assistant",
                overlap: int = 0, layout: str = "auto") -> EncodedSource:
    """Tokenise normalised rows (see formats.py) into examples; see the module docstring, and completion.py for
    `layout` (auto, chat or completion; causal models only).

    Rows that cannot be used (chat the template rejects, too long after truncation) are counted and skipped,
    or raise a DataError naming the row when `strict`. Raises DataError when no example is left.
    """
    completion = task_type == "causal" and resolve_layout(layout, rows, tokenizer, source_name) == "completion"
    options = Layout(max_length, task_type, train_on, overlap, completion)
    options.check()
    prepare_tokenizer(tokenizer)
    bad = BadRows(f"source '{source_name}'", strict)
    return collect(rows, encode_batch(rows, tokenizer, options, source_name), bad, source_name)
