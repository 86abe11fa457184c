"""`lmdistill data PATH`: detect, load, tokenise and summarise a data source (the CLI prints this dict)."""

from __future__ import annotations

from collections import Counter
from itertools import groupby
from pathlib import Path
from typing import Any

from lmdistill.data.formats import load_source
from lmdistill.data.render import PLAIN_HEADERS, plain_history, to_messages
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


def _render_row(row: dict) -> str:
    """A normalised row as text with the trained-on part marked, for when no tokenizer is given."""
    if "text" in row:
        return f"{MARK_OPEN}{row['text']}{MARK_CLOSE}"
    messages = to_messages(row)
    return plain_history(messages[:-1]) + PLAIN_HEADERS["assistant"] + f"{MARK_OPEN}{messages[-1]['content']}{MARK_CLOSE}"


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
                   task_type: str = "causal") -> dict:
    """Summary of a source: format, rows read, kept, skipped per reason, first skipped rows, and the first
    example rendered with its trained-on tokens in [[ ]]. `tokenizer` is a tokenizer, a folder to load one
    from, or None (then rows are only loaded, not tokenised, and the example is shown as text)."""
    loaded = load_source(path, strict=strict)
    skipped, first = Counter(loaded.skipped), list(loaded.first_skipped)
    tokenizer = _load_tokenizer(tokenizer)
    if tokenizer is None:
        kept, example = len(loaded.rows), _render_row(loaded.rows[0])
    else:
        enc = encode_rows(loaded.rows, tokenizer, max_length=max_length, task_type=task_type, strict=strict,
                          source_name=Path(str(path)).name)
        skipped.update(enc.skipped)
        first.extend(enc.first_skipped)
        kept, ex = len(enc.examples), enc.examples[0]
        if task_type == "seq2seq":
            example = (tokenizer.decode(ex["input_ids"], skip_special_tokens=False) + "\n"
                       + MARK_OPEN + tokenizer.decode(ex["labels"], skip_special_tokens=False) + MARK_CLOSE)
        else:
            example = mark_trained(ex["input_ids"], ex["labels"], tokenizer)
    return {"format": loaded.format, "rows": loaded.num_read, "kept": kept, "skipped": dict(skipped),
            "first_skipped": first, "example": example}
