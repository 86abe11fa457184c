"""The completion layout: a base model (no chat template) continuing text verbatim.

A row's prompt and completion are joined exactly as written, after the ids the tokenizer itself puts in front of
a text (its BOS as it defines it: `<s>` for Llama, `</s>` for OPT, nothing for GPT-2), with no template around
them; only the completion is trained on. Plain text rows train on every token. The eos token follows only where
the text ended: rows a `generate` run cut at max_new_tokens (`finished: false`) get none, so the student does not
learn to stop mid-sentence.

Text rows have no prompt of their own: `text_prompt_length` takes the first part of each text as one, both for the
teacher to continue (`generate`) and for held-out continuations in evaluation.
"""

from __future__ import annotations

from typing import Any

from lmdistill.errors import DataError

LAYOUTS = ("auto", "chat", "completion")
_PROBE = "a"


def special_prefix(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts in front of a text by itself (add_special_tokens=True); [] when none."""
    plain = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    full = tokenizer(_PROBE)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []


def has_response(row: dict) -> bool:
    """Whether a normalised row has something to train on (prompt-only rows have not)."""
    return "text" in row or "messages" in row or "response" in row or "target" in row


def resolve_layout(layout: str, rows: list[dict], tokenizer: Any, source_name: str) -> str:
    """"chat" or "completion" for a source's rows (see SourceSettings.layout)."""
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout '{layout}' for source '{source_name}': use one of {', '.join(LAYOUTS)}.")
    if layout == "auto":
        generated = any("finished" in row for row in rows)  # a file `lmdistill generate` wrote: prompts templated
        plain = all("text" in row or not has_response(row) for row in rows)
        templated = bool(getattr(tokenizer, "chat_template", None))
        return "completion" if generated or (plain and not templated) else "chat"
    if layout == "completion" and any("messages" in row for row in rows):
        raise DataError(f"source '{source_name}' holds chat conversations, which the completion layout cannot "
                        "continue verbatim: use layout 'chat', or give text, prompt or prompt/completion rows.")
    return layout


def completion_parts(row: dict) -> tuple[str, str]:
    """(prompt, completion) text of a prompt/response, source/target or prompt-only row, as written."""
    if "prompt" in row:
        return row["prompt"], row.get("response", "")
    return row["source"], row["target"]


def text_prompt_words(fraction: float, tokens: int | None = None) -> str:
    """Which part of a text `text_prompt_length` takes as its prompt, in words for the log."""
    return f"its first {tokens} tokens" if tokens else f"the first {fraction:.0%} of its tokens"


def text_prompt_length(example: dict, fraction: float, tokens: int | None = None) -> int:
    """How many leading ids of a plain-text example (one with "text_tokens") make its prompt: the tokenizer's
    prefix, then the first `tokens` of the text (or `fraction` of them), leaving at least one to continue with."""
    head, size = example["prompt_length"], example["text_tokens"]
    wanted = tokens if tokens is not None else round(fraction * size)
    return head + max(1, min(wanted, size - 1))
