"""Byte-offset alignment of two tokenisations of the same content (cross-tokenizer distillation).

Coordinates are byte positions in the *content*: the UTF-8 bytes both sides share, in order (for a chat, the
messages' contents; for plain text, the text). Each token gets the content range [start, end) it covers, from the
fast tokenizer's character offsets. A token that covers no content (a BOS, a chat template's role markers and
end-of-turn tokens, which differ between model families) is zero-width at the content position where it sits.

`align` groups the tokens of both sides into spans, a partition of both sequences in order:
  * a *template span* holds the zero-width tokens sitting at one position (either side may have none);
  * a *content span* is the smallest run of tokens on both sides whose byte ranges end at the same byte, with no
    token of either side straddling that byte. The pieces of one character (byte-level BPE splits a Chinese
    character or an emoji into several tokens that all carry the character's offsets; SentencePiece's byte
    fallback does the same) therefore stay in one span.
Byte-level BPE ("Ġworld") and metaspace ("▁world") both count the space before a word as that word's first byte,
so their spans agree at word boundaries; a BOS on one side only is a template span of its own.

`boundary_pairs` turns spans into the token pairs a logit loss compares: at the end of every span both sides have
read exactly the same content, so the last token of the span on each side predicts the same continuation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Range = tuple[int, int]

# The rule a teacher cache across tokenizers records with its pairs (a cache made under another rule is refused):
# the last tokens of each span (`boundary_pairs`), kept where the student's label mask counts the next token
# (lmdistill.train.cross_tokenizer). Change the name whenever either changes.
ALIGNMENT = "byte-spans/last-token/label-mask/1"


@dataclass(frozen=True)
class Span:
    """Token index ranges [start, end) on side a and side b."""

    a: Range
    b: Range


def content_positions(text: str, contents: Sequence[str]) -> tuple[list[int], list[bool]]:
    """For a rendered `text` holding `contents` in order: the content byte position at each character boundary
    (len(text) + 1 values) and whether each character is content (False: template text between the contents).

    Raises ValueError when a content is not in the text verbatim (the template rewrote it)."""
    is_content = [False] * len(text)
    at = 0
    for content in contents:
        found = text.find(content, at)
        if found < 0:
            raise ValueError(f"content {content[:40]!r} is not in the rendered text verbatim (the chat template "
                             "changes it), so the two tokenisations cannot be aligned")
        is_content[found:found + len(content)] = [True] * len(content)
        at = found + len(content)
    positions = [0]
    for char, counted in zip(text, is_content):
        positions.append(positions[-1] + (len(char.encode("utf-8")) if counted else 0))
    return positions, is_content


def token_ranges(offsets: Sequence[Range], text: str, contents: Sequence[str] | None = None) -> list[Range]:
    """Content byte ranges of tokens given their character `offsets` into `text` (a fast tokenizer's
    offset_mapping). contents=None: the whole text is content."""
    positions, is_content = content_positions(text, [text] if contents is None else contents)
    ranges = []
    for start, end in offsets:
        inside = [c for c in range(start, end) if is_content[c]]
        ranges.append((positions[inside[0]], positions[inside[-1] + 1]) if inside
                      else (positions[start], positions[start]))
    return ranges


def _inside(ranges: Sequence[Range], k: int, end: int) -> bool:
    """Whether token k starts before byte `end` (a piece of what is already in the span)."""
    return k < len(ranges) and ranges[k][0] < end


def align(a: Sequence[Range], b: Sequence[Range]) -> list[Span]:
    """Spans over two token sequences given their content byte ranges (see the module docstring). When the two
    sides do not cover the same content to the end, the rest of both sides is one last span."""
    spans: list[Span] = []
    i = j = at = 0
    while i < len(a) or j < len(b):
        i0, j0 = i, j
        while i < len(a) and a[i][0] == a[i][1] <= at:
            i += 1
        while j < len(b) and b[j][0] == b[j][1] <= at:
            j += 1
        if (i, j) == (i0, j0):
            end_a = end_b = at
            while i < len(a) or j < len(b):
                if end_a == end_b > at and not _inside(a, i, end_a) and not _inside(b, j, end_b):
                    break
                if i < len(a) and (end_a < end_b or end_a == at or j == len(b) or _inside(a, i, end_a)):
                    end_a, i = max(end_a, a[i][1]), i + 1
                elif j < len(b):
                    end_b, j = max(end_b, b[j][1]), j + 1
                else:
                    break  # a is used up while b has passed it: nothing more coincides
            at = max(end_a, end_b)
        spans.append(Span((i0, i), (j0, j)))
    return spans


def boundary_pairs(spans: Sequence[Span]) -> list[tuple[int, int]]:
    """(a token, b token) at the end of each span: both have read the same content, so the logits there predict
    the same continuation. A span with one side empty pairs that side's last token before it."""
    pairs = []
    for span in spans:
        last_a, last_b = span.a[1] - 1, span.b[1] - 1
        if last_a >= 0 and last_b >= 0 and (span.a[0] < span.a[1] or span.b[0] < span.b[1]):
            pairs.append((last_a, last_b))
    return pairs
