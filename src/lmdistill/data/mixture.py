"""Mixing named sources over training: ratio schedules, a reproducible mixture dataset, and
evaluation-driven reweighting.

The trainer reads MixtureDataset in order (item i at step i // batch). Sources are picked with a golden-ratio
(Weyl) sequence rather than independent coin flips, so the share of each source in any window of draws follows
the schedule to within a few draws instead of sqrt(n) noise. Within a source, rows are walked without
replacement: a seeded permutation per pass, reshuffled every pass, so an epoch is every row once. Which row comes
next therefore depends on how often its source was picked before: items are planned in order, a pure function of
the seed and the feedback history (what multipliers applied from which draw on), which state_dict carries so that
a resumed run plans the same items.
"""

from __future__ import annotations

import bisect
import math
import random
from array import array
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

    Item i: the source is picked with the probabilities at progress i / num_draws (the scheduled source gets
    schedule.share(p), the others split the rest in proportion to `weights`; evaluation feedback then scales
    each source and renormalises), then the source's next row in its current pass. When feedback weighs the
    buckets of a source, a bucket is drawn first (in proportion to size x multiplier) and walked alike. Items
    are copies of the examples with "example_id" added.

    round_size: draws read together by all processes (batch size x processes). Feedback applies from the first
    round not yet read, so every process, each having read its own part of the same round, starts it at the
    same draw.
    """

    def __init__(self, sources: Mapping[str, list[dict]], weights: Mapping[str, float],
                 schedule: RatioSchedule | None = None, num_draws: int = 10_000, seed: int = 0,
                 round_size: int = 1) -> None:
        self.names = list(sources)
        _check_sources(sources, weights, schedule, num_draws)
        self.sources = {name: list(examples) for name, examples in sources.items()}
        self.weights = {name: float(weights[name]) for name in self.names}
        self.schedule = schedule
        self.num_draws = num_draws
        self.seed = seed
        self.round_size = round_size
        self.epoch_size = sum(len(examples) for examples in self.sources.values())
        self._offset = random.Random(seed).random()
        # per source: bucket -> positions of its examples (None is the bucket of rows without one)
        self._buckets: dict[str, dict[str | None, list[int]]] = {}
        for name, examples in self.sources.items():
            groups: dict[str | None, list[int]] = {}
            for pos, example in enumerate(examples):
                groups.setdefault(example.get("bucket"), []).append(pos)
            self._buckets[name] = groups
        # Feedback history: multipliers in force from each start draw on (starts increasing).
        self._feedback_starts: list[int] = []
        self._feedback: list[dict[str, float]] = []
        self._read_to = 0  # one past the furthest item read
        self._reset_plan()

    def __len__(self) -> int:
        return self.num_draws

    @property
    def passes(self) -> float:
        """Epochs over the sources that the draws make up (draws / rows)."""
        return self.num_draws / self.epoch_size

    @property
    def multipliers(self) -> dict[str, float]:
        """The latest feedback multipliers (empty before any feedback)."""
        return dict(self._feedback[-1]) if self._feedback else {}

    def groups(self) -> list[str]:
        """Names that feedback may address: the sources, then the buckets found in them."""
        buckets = {b for groups in self._buckets.values() for b in groups if b is not None}
        return self.names + sorted(buckets - set(self.names))

    def probabilities(self, progress: float) -> dict[str, float]:
        """Source probabilities at `progress` in [0, 1], after the latest feedback."""
        return self._probabilities(progress, self.multipliers)

    def _probabilities(self, progress: float, multipliers: Mapping[str, float]) -> dict[str, float]:
        base = {n: self.weights[n] for n in self.names}
        if self.schedule is not None:
            share, rest = self.schedule.share(progress), [n for n in self.names if n != self.schedule.source]
            rest_total = sum(base[n] for n in rest)
            base = {n: share if n == self.schedule.source else (1 - share) * base[n] / rest_total for n in self.names}
        scaled = {n: base[n] * multipliers.get(n, 1.0) for n in self.names}
        total = sum(scaled.values())
        return {n: v / total for n, v in scaled.items()}

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_draws:
            raise IndexError(f"index {index} out of range for a mixture of {self.num_draws} draws")
        self._read_to = max(self._read_to, index + 1)
        while len(self._plan_source) <= index:
            source_index, position = self._draw(len(self._plan_source))
            self._plan_source.append(source_index)
            self._plan_position.append(position)
        source_index, position = self._plan_source[index], self._plan_position[index]
        example = self.sources[self.names[source_index]][position]
        return {**example, "example_id": source_index * ID_STRIDE + example.get("row_id", position)}

    def _reset_plan(self) -> None:
        # item -> source index, and position in the source (arrays: 16 bytes a draw, for stages of millions)
        self._plan_source, self._plan_position = array("q"), array("q")
        self._drawn: dict[tuple, int] = {}  # stream (source, or source and bucket) -> rows taken from it so far
        self._orders: dict[tuple, tuple[int, array]] = {}  # stream -> (pass, its permutation)
        self._bucket_cache: dict[tuple[int, str], tuple[list, list[float]] | None] = {}

    def _draw(self, index: int) -> tuple[int, int]:
        """(source index, position) of item `index`; items before it are planned already."""
        at = bisect.bisect_right(self._feedback_starts, index) - 1
        multipliers = self._feedback[at] if at >= 0 else {}
        probs = self._probabilities(index / self.num_draws, multipliers)
        source_index = _pick(list(probs.values()), (self._offset + index * _GOLDEN) % 1.0)
        name = self.names[source_index]
        buckets = self._bucket_weights(at, name)
        if buckets is not None:
            keys, weights = buckets
            bucket = keys[_pick(weights, random.Random(f"{self.seed}:{index}").random() * sum(weights))]
            stream, members = (name, bucket), self._buckets[name][bucket]
        else:
            stream, members = (name,), None
        size = len(members) if members is not None else len(self.sources[name])
        taken = self._drawn.get(stream, 0)
        self._drawn[stream] = taken + 1
        pass_, order = self._orders.get(stream, (-1, array("q")))
        if pass_ != taken // size:
            pass_, shuffled = taken // size, list(range(size))
            random.Random(f"{self.seed}:{stream}:{pass_}").shuffle(shuffled)
            order = array("q", shuffled)
            self._orders[stream] = (pass_, order)
        position = order[taken % size]
        return source_index, members[position] if members is not None else position

    def _bucket_weights(self, at: int, name: str) -> tuple[list, list[float]] | None:
        """(buckets, size x multiplier) of source `name` under feedback entry `at` (-1: none), or None when that
        feedback does not weigh its buckets. Cached: computed once per entry and source, not per draw."""
        if (at, name) not in self._bucket_cache:
            multipliers, groups = self._feedback[at] if at >= 0 else {}, self._buckets[name]
            weighed = any(b in multipliers for b in groups if b is not None and b not in self.names)
            self._bucket_cache[(at, name)] = (list(groups), [
                len(members) * (1.0 if b in self.names else multipliers.get(b, 1.0)) for b, members in groups.items()
            ]) if weighed else None
        return self._bucket_cache[(at, name)]

    def set_feedback(self, multipliers: Mapping[str, float]) -> None:
        """Evaluation-driven multipliers per source or per bucket (a name that is both counts as a source),
        in force from the first round of draws not yet read.

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
        start = -(-self._read_to // self.round_size) * self.round_size
        merged = self.multipliers | {name: float(v) for name, v in multipliers.items()}
        if self._feedback_starts and self._feedback_starts[-1] == start:
            self._feedback[-1] = merged
        else:
            self._feedback_starts.append(start)
            self._feedback.append(merged)
        self._bucket_cache.clear()
        if start < len(self._plan_source):  # items planned ahead of reading (random access): plan them again
            self._reset_plan()

    def current_feedback(self, names: list[str]) -> dict[str, float]:
        """The feedback multipliers of `names` normalised to sum to 1 (uniform before any feedback)."""
        latest = self.multipliers
        values = {n: latest.get(n, 1.0) for n in names}
        total = sum(values.values())
        return {n: v / total for n, v in values.items()}

    def state_dict(self) -> dict:
        return {"seed": self.seed, "num_draws": self.num_draws, "sources": {n: len(e) for n, e in self.sources.items()},
                "feedback": [[start, dict(m)] for start, m in zip(self._feedback_starts, self._feedback)]}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore the feedback history of a resumed run; the sources, seed and length must be those it was saved
        with."""
        mine = self.state_dict()
        for key in ("seed", "num_draws", "sources"):
            if state[key] != mine[key]:
                raise DataError(f"cannot resume the data mixture: saved {key} {state[key]} differs from the current "
                                f"{mine[key]}. Resume with the same data and seed, or start the stage afresh.")
        self._feedback_starts = [int(start) for start, _ in state["feedback"]]
        self._feedback = [dict(m) for _, m in state["feedback"]]
        self._reset_plan()


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
