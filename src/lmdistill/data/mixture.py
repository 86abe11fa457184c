"""Mixing named sources over training: ratio schedules, a reproducible mixture dataset, and
evaluation-driven reweighting.

The trainer reads MixtureDataset sequentially (item i at step i // batch), so item i must not depend on
what was read before: it is a pure function of (seed, i, current weights). Sources are picked with a
golden-ratio (Weyl) sequence rather than independent coin flips, so the share of each source in any window
of draws follows the schedule to within a few draws instead of sqrt(n) noise.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass

from torch.utils.data import Dataset

from lmdistill.errors import ConfigError, DataError

SCHEDULE_KINDS = ("constant", "linear", "cosine")
ID_STRIDE = 1 << 40  # example_id = source_index * ID_STRIDE + row_id
_GOLDEN = (math.sqrt(5) - 1) / 2


@dataclass(frozen=True)
class RatioSchedule:
    """Share of one source over a stage: `start` at progress 0, `end` at progress 1 (constant: start throughout)."""

    kind: str = "constant"
    source: str = "domain"
    start: float = 0.5
    end: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ConfigError(f"ratio schedule kind '{self.kind}' is unknown: use one of {', '.join(SCHEDULE_KINDS)}.")
        for name, value in (("start", self.start), ("end", self.end)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"ratio schedule {name} = {value} for source '{self.source}' must be in [0, 1].")
        if self.kind == "constant" and self.end is not None and self.end != self.start:
            raise ConfigError(f"constant ratio schedule for '{self.source}' has start {self.start} but end "
                              f"{self.end}: use kind 'linear' or 'cosine' to change the share over the stage.")

    def share(self, progress: float) -> float:
        """The scheduled source's share at `progress` in [0, 1] (clamped)."""
        p = min(max(progress, 0.0), 1.0)
        end = self.start if self.end is None else self.end
        if self.kind == "linear":
            return self.start + (end - self.start) * p
        if self.kind == "cosine":
            return self.start + (end - self.start) * (1 - math.cos(math.pi * p)) / 2
        return self.start


def split_example_id(example_id: int) -> tuple[int, int]:
    """(source index, row_id) of an example_id made by MixtureDataset."""
    return divmod(example_id, ID_STRIDE)


class MixtureDataset(Dataset):
    """A map-style dataset of `num_draws` items drawn from named sources of examples.

    Item i: the source is drawn with the probabilities at progress i / num_draws (the scheduled source gets
    schedule.share(p), the others split the rest in proportion to `weights`; evaluation feedback then scales
    each source and renormalises), then a bucket of that source in proportion to size x bucket feedback, then
    an example of it uniformly. Items are copies of the examples with "example_id" added.
    """

    def __init__(self, sources: Mapping[str, list[dict]], weights: Mapping[str, float],
                 schedule: RatioSchedule | None = None, num_draws: int = 10_000, seed: int = 0) -> None:
        self.names = list(sources)
        _check_sources(sources, weights, schedule, num_draws)
        self.sources = {name: list(examples) for name, examples in sources.items()}
        self.weights = {name: float(weights[name]) for name in self.names}
        self.schedule = schedule
        self.num_draws = num_draws
        self.seed = seed
        self._offset = random.Random(seed).random()
        # per source: bucket -> positions of its examples (None is the bucket of rows without one)
        self._buckets: dict[str, dict[str | None, list[int]]] = {}
        for name, examples in self.sources.items():
            groups: dict[str | None, list[int]] = {}
            for pos, example in enumerate(examples):
                groups.setdefault(example.get("bucket"), []).append(pos)
            self._buckets[name] = groups
        self.multipliers: dict[str, float] = {}

    def __len__(self) -> int:
        return self.num_draws

    def groups(self) -> list[str]:
        """Names that feedback may address: the sources, then the buckets found in them."""
        buckets = {b for groups in self._buckets.values() for b in groups if b is not None}
        return self.names + sorted(buckets - set(self.names))

    def probabilities(self, progress: float) -> dict[str, float]:
        """Source probabilities at `progress` in [0, 1], after feedback."""
        base = {n: self.weights[n] for n in self.names}
        if self.schedule is not None:
            share, rest = self.schedule.share(progress), [n for n in self.names if n != self.schedule.source]
            rest_total = sum(base[n] for n in rest)
            base = {n: share if n == self.schedule.source else (1 - share) * base[n] / rest_total for n in self.names}
        scaled = {n: base[n] * self.multipliers.get(n, 1.0) for n in self.names}
        total = sum(scaled.values())
        return {n: v / total for n, v in scaled.items()}

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_draws:
            raise IndexError(f"index {index} out of range for a mixture of {self.num_draws} draws")
        probs = self.probabilities(index / self.num_draws)
        u = (self._offset + index * _GOLDEN) % 1.0
        source_index = _pick(list(probs.values()), u)
        name = self.names[source_index]
        rng = random.Random(f"{self.seed}:{index}")
        groups = self._buckets[name]
        keys = list(groups)
        bucket_weights = [len(groups[k]) * self.multipliers.get(k, 1.0) for k in keys]
        members = groups[keys[_pick(bucket_weights, rng.random() * sum(bucket_weights))]]
        position = members[rng.randrange(len(members))]
        example = self.sources[name][position]
        return {**example, "example_id": source_index * ID_STRIDE + example.get("row_id", position)}

    def set_feedback(self, multipliers: Mapping[str, float]) -> None:
        """Evaluation-driven multipliers per source or per bucket (a name that is both counts as a source).

        Only ratios matter within sources and within buckets, so reweight_by_gap's output can be passed as is.
        Replaces earlier feedback for the names given.
        """
        known = self.groups()
        for name, value in multipliers.items():
            if name not in known:
                raise DataError(f"feedback for '{name}', which is neither a source nor a bucket of this mixture "
                                f"(known: {', '.join(known)}).")
            if not (value > 0 and math.isfinite(value)):
                raise DataError(f"feedback multiplier for '{name}' is {value}; it must be a positive number.")
        self.multipliers.update({name: float(v) for name, v in multipliers.items()})

    def current_feedback(self, names: list[str]) -> dict[str, float]:
        """The feedback multipliers of `names` normalised to sum to 1 (uniform before any feedback)."""
        values = {n: self.multipliers.get(n, 1.0) for n in names}
        total = sum(values.values())
        return {n: v / total for n, v in values.items()}

    def state_dict(self) -> dict:
        return {"seed": self.seed, "num_draws": self.num_draws, "multipliers": dict(self.multipliers),
                "sources": {n: len(e) for n, e in self.sources.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore feedback for a resumed run; the sources, seed and length must be those it was saved with."""
        mine = self.state_dict()
        for key in ("seed", "num_draws", "sources"):
            if state[key] != mine[key]:
                raise DataError(f"cannot resume the data mixture: saved {key} {state[key]} differs from the current "
                                f"{mine[key]}. Resume with the same data and seed, or start the stage afresh.")
        self.multipliers = dict(state["multipliers"])


def _pick(weights: list[float], u: float) -> int:
    """Index whose cumulative weight first exceeds u, for u in [0, sum(weights))."""
    acc = 0.0
    for i, w in enumerate(weights):
        acc += w
        if u < acc:
            return i
    return max(i for i, w in enumerate(weights) if w > 0)  # float round-off at the very top


def _check_sources(sources: Mapping[str, list[dict]], weights: Mapping[str, float],
                   schedule: RatioSchedule | None, num_draws: int) -> None:
    if not sources:
        raise DataError("a data mixture needs at least one source.")
    for name, examples in sources.items():
        if not examples:
            raise DataError(f"mixture source '{name}' has no examples; remove it or fix its data.")
        if name not in weights or not weights[name] >= 0:
            raise ConfigError(f"mixture source '{name}' needs a weight >= 0 (weights given: {dict(weights)}).")
    extra = set(weights) - set(sources)
    if extra:
        raise ConfigError(f"mixture weights name unknown source(s) {sorted(extra)}; sources are {list(sources)}.")
    if schedule is not None:
        if schedule.source not in sources:
            raise ConfigError(f"ratio schedule source '{schedule.source}' is not a source of the mixture "
                              f"({', '.join(sources)}).")
        others = [n for n in sources if n != schedule.source]
        if not others or sum(weights[n] for n in others) <= 0:
            raise ConfigError(f"ratio schedule on '{schedule.source}' needs another source with a positive weight "
                              f"to take the rest of the share.")
    elif sum(weights.values()) <= 0:
        raise ConfigError("mixture weights sum to 0: give at least one source a positive weight.")
    if num_draws < 1:
        raise ConfigError(f"mixture num_draws must be positive, got {num_draws}.")


def reweight_by_gap(gaps: Mapping[str, float], current: Mapping[str, float], *, sharpness: float = 1.0,
                    min_weight: float = 0.05) -> dict[str, float]:
    """Next sampling weights from teacher-student gaps per source or bucket.

    Multiplicative weights, as in Group DRO and DoReMi: a group that stays behind keeps gaining weight over
    successive evaluations, and loses it again once its gap falls below the others'.

    w_k ∝ current_k * exp(sharpness * gap_k / mean|gap|), so the scale of the gap (nats, loss units) does not
    matter and equal gaps keep the current weights; then every weight is raised to at least `min_weight`
    (taking the mass from the others) so nothing vanishes. Groups without a gap count as an average one.
    Returns weights over current's keys that sum to 1.
    """
    unknown = set(gaps) - set(current)
    if unknown:
        raise DataError(f"gaps given for {sorted(unknown)}, which have no current weight ({', '.join(current)}).")
    if not current or min_weight * len(current) > 1:
        raise ConfigError(f"min_weight {min_weight} x {len(current)} groups exceeds 1: lower min_weight.")
    if any(not math.isfinite(g) for g in gaps.values()):
        raise DataError(f"teacher-student gaps must be finite numbers, got {dict(gaps)}.")
    mean = sum(gaps.values()) / len(gaps) if gaps else 0.0
    filled = {k: gaps.get(k, mean) for k in current}
    scale = sum(abs(g) for g in filled.values()) / len(filled) or 1.0
    raw = {k: max(current[k], 0.0) * math.exp(sharpness * (filled[k] - max(filled.values())) / scale)
           for k in current}
    total = sum(raw.values()) or 1.0
    return _with_floor({k: v / total for k, v in raw.items()}, min_weight)


def _with_floor(weights: dict[str, float], floor: float) -> dict[str, float]:
    """Raise weights below `floor` to it and shrink the others proportionally, until all are >= floor."""
    fixed: set[str] = set()
    while True:
        free = [k for k in weights if k not in fixed]
        free_total = sum(weights[k] for k in free)
        mass = 1.0 - floor * len(fixed)
        out = {k: floor if k in fixed else (weights[k] * mass / free_total if free_total else mass / len(free))
               for k in weights}
        low = {k for k in free if out[k] < floor}
        if not low:
            return out
        fixed |= low
