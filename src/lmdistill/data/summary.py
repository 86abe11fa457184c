"""`lmdistill data PATH`: detect, load, tokenise and summarise a data source (the CLI prints this dict)."""

from __future__ import annotations

from collections import Counter
from itertools import groupby
from pathlib import Path
from typing import Any

from lmdistill.data.formats import load_source
from lmdistill.data.completion import has_response
from lmdistill.data.render import render_prompt, render_segments
from lmdistill.data.tokenize import IGNORE_INDEX, encode_rows
from lmdistill.errors import DataError

MARK_OPEN, MARK_CLOSE = "[[", "]]"


def mark_trained(input_ids: list[int], labels: list[int], tokenizer: Any) -> str:
    """Decode a causal example with its trained-on tokens (label != -100) wrapped in [[ ]]."""
    parts = []
    pairs = list(zip(input_ids, labels))
    for trained, run in groupby(pairs, key=lambda p: p[1] != IGNORE_INDEX):
        text = tokenizer.decode([t for t, _ in run], skip_special_tokens=False)
        parts.append(f"{MARK_OPEN}{text}{MARK_CLOSE}" if trained else text)
    return "".join(parts)


def _render_row(row: dict, train_on: str) -> str:
    """A normalised row as text with the trained-on parts marked, for when no tokenizer is given."""
    if "text" in row:
        return f"{MARK_OPEN}{row['text']}{MARK_CLOSE}"
    if not has_response(row):
        return render_prompt(row, None)
    (segments,) = render_segments(row, None, train_on)[-1:]
    return "".join(f"{MARK_OPEN}{text}{MARK_CLOSE}" if trained else text for text, trained in segments)


def layouts(rows: list[dict]) -> dict[str, int]:
    """How many rows of each layout the source holds (a chat can count under several)."""
    counts: Counter[str] = Counter()
    for row in rows:
        kind = "text" if "text" in row else "chat" if "messages" in row else "seq2seq" if "source" in row else \
            "pair" if "response" in row else "prompt"
        counts[kind] += 1
        messages = row.get("messages", [])
        counts["multi_turn"] += sum(m["role"] == "assistant" for m in messages) > 1
        counts["tool_calls"] += any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
        counts["system"] += bool(row.get("system")) or any(m["role"] == "system" for m in messages)
    return {k: v for k, v in counts.items() if v}


def _load_tokenizer(tokenizer: Any) -> Any:
    if not isinstance(tokenizer, (str, Path)):
        return tokenizer
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tokenizer))
    except Exception as e:  # OSError for a missing dir, ValueError for an unknown tokenizer class, ...
        raise DataError(f"cannot load a tokenizer from {tokenizer}: {str(e).strip().splitlines()[0]}. Pass a "
                        f"folder saved with save_pretrained (a model folder works).") from None


def summarize_data(path: str | Path, tokenizer: Any = None, max_length: int = 512, strict: bool = False,
                   task_type: str = "causal", columns: dict[str, str] | None = None,
                   train_on: str = "all_assistant", overlap: int = 0) -> dict:
    """Summary of a source: format, rows read, kept, skipped per reason, first skipped rows, columns left unused,
    the layouts found (rows per kind; `windows`: examples cut from long texts), and the first example rendered
    with its trained-on tokens in [[ ]]. `tokenizer` is a tokenizer, a folder to load one from, or None (then
    rows are only loaded, not tokenised, and the example is shown as text in the plain template)."""
    loaded = load_source(path, strict=strict, columns=columns)
    skipped, first = Counter(loaded.skipped), list(loaded.first_skipped)
    found = layouts(loaded.rows)
    tokenizer = _load_tokenizer(tokenizer)
    if tokenizer is None:
        kept, example = len(loaded.rows), _render_row(loaded.rows[0], train_on)
    else:
        enc = encode_rows(loaded.rows, tokenizer, max_length=max_length, task_type=task_type, strict=strict,
                          source_name=Path(str(path)).name, train_on=train_on, overlap=overlap)
        skipped.update(enc.skipped)
        first.extend(enc.first_skipped)
        found |= {k: v for k, v in (("windows", enc.windows), ("split_rows", enc.split_rows)) if v}
        kept, ex = len(enc.examples), enc.examples[0]
        if task_type == "seq2seq":
            example = (tokenizer.decode(ex["input_ids"], skip_special_tokens=False) + "\n"
                       + MARK_OPEN + tokenizer.decode(ex["labels"], skip_special_tokens=False) + MARK_CLOSE)
        else:
            example = mark_trained(ex["input_ids"], ex["labels"], tokenizer)
    return {"format": loaded.format, "rows": loaded.num_read, "kept": kept, "skipped": dict(skipped),
            "first_skipped": first, "columns": columns or {}, "ignored_columns": loaded.ignored_columns,
            "layouts": found, "example": example}
