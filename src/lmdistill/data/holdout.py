"""Evaluation rows held out of the training sources when a config names no eval set.

A fixed share of each source's rows, chosen by a permutation seeded with the run's seed and the source's name, so
every re-run, resume and process holds out the same rows, and none of them is ever trained on. All examples of a
row (the windows of a long text, the turns of a chat) go to the same side. The held-out set of a source carries
the source's name, as an eval set named like a source does (evaluation-driven sampling reads it).
"""

from __future__ import annotations

import random


def split_holdout(examples: list[dict], fraction: float, max_rows: int | None, seed: int,
                  name: str) -> tuple[list[dict], list[dict]]:
    """(training examples, held-out examples): floor(fraction * rows) rows, at most `max_rows`, in source order.
    A row's examples are consecutive, its first one with part 0 (or no part)."""
    rows: list[list[int]] = []
    for i, example in enumerate(examples):
        if example.get("part", 0) == 0 or not rows:
            rows.append([i])
        else:
            rows[-1].append(i)
    count = int(len(rows) * fraction)
    if max_rows is not None:
        count = min(count, max_rows)
    if count == 0:
        return examples, []
    held = {i for row in random.Random(f"{seed}:{name}").sample(range(len(rows)), count) for i in rows[row]}
    return ([ex for i, ex in enumerate(examples) if i not in held],
            [ex for i, ex in enumerate(examples) if i in held])
