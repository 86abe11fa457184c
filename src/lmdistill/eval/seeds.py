"""A run repeated over training seeds (`lmdistill demo --seeds K`): RUN_DIR/seeds.json keeps each seed's metrics
(role -> metric -> value, as metrics.json holds one run's), and the report shows their mean and spread. A tiny model's
greedy answers flip with the rounding order of its training, so one seed's exact match can move by 0.1 between
numerically equivalent runs; the mean over seeds is what a claim should rest on."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from lmdistill.errors import LmdistillError

SEEDS_FILE = "seeds.json"
Metrics = dict[str, dict[str, float]]  # role -> metric -> value


@dataclass(frozen=True)
class SeedRuns:
    """The training seeds of the repeated runs and each one's metrics, in the same order."""

    seeds: list[int]
    metrics: list[Metrics]

    def __post_init__(self) -> None:
        if not self.seeds or len(self.seeds) != len(self.metrics):
            raise ValueError(f"{len(self.seeds)} seeds for {len(self.metrics)} runs' metrics")

    def mean_std(self) -> tuple[Metrics, Metrics]:
        """(mean, sample standard deviation) per role and metric that every seed's run has (others are left out);
        the deviation is 0 with one seed."""
        means: Metrics = {}
        stds: Metrics = {}
        for role in self.metrics[0]:
            keys = [k for k in self.metrics[0][role] if all(k in run.get(role, {}) for run in self.metrics)]
            values = {k: [run[role][k] for run in self.metrics] for k in keys}
            means[role] = {k: statistics.fmean(v) for k, v in values.items()}
            stds[role] = {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in values.items()}
        return means, stds


def write_seed_runs(run_dir: str | Path, runs: SeedRuns) -> Path:
    path = Path(run_dir) / SEEDS_FILE
    path.write_text(json.dumps({"seeds": runs.seeds, "metrics": runs.metrics}, indent=1), encoding="utf-8")
    return path


def read_seed_runs(run_dir: str | Path) -> SeedRuns | None:
    """RUN_DIR/seeds.json, or None for a run that has none (`lmdistill run` writes none; the demo does)."""
    path = Path(run_dir) / SEEDS_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return SeedRuns([int(s) for s in data["seeds"]], [dict(m) for m in data["metrics"]])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LmdistillError(f"{path} could not be read ({type(err).__name__}: {err}); delete it, or run the seeds "
                             "again") from None
