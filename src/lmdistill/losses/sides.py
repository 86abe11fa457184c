"""Which sides of an encoder-decoder model (encoder, decoder, cross-attention) an auxiliary term covers."""

from __future__ import annotations

from collections.abc import Sequence

from lmdistill.losses.errors import LossConfigError


def check_sides(sides: Sequence[str] | None, allowed: tuple[str, ...], term: str) -> tuple[str, ...]:
    """None -> every allowed side; otherwise a non-empty list of distinct allowed sides, kept in `allowed` order."""
    if sides is None:
        return allowed
    if isinstance(sides, str) or not sides:
        raise LossConfigError(f"{term} loss: sides must be a non-empty list drawn from {list(allowed)}, got {sides!r}")
    unknown = [s for s in sides if s not in allowed]
    if unknown:
        raise LossConfigError(f"{term} loss: unknown side(s) {unknown}; choose from {list(allowed)}")
    if len(set(sides)) != len(sides):
        raise LossConfigError(f"{term} loss: sides {list(sides)} repeat a side; list each once")
    return tuple(s for s in allowed if s in sides)
