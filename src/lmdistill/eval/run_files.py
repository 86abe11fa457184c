"""Read what a pipeline run left in its folder, tolerating whatever is missing: the report renders any run."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmdistill.config import CONFIG_FILE
from lmdistill.errors import LmdistillError
from lmdistill.eval.evaluate import read_metrics
from lmdistill.eval.samples import read_samples
from lmdistill.eval.seeds import SeedRuns, read_seed_runs

logger = logging.getLogger(__name__)

STATE_FILE = "pipeline_state.json"
LOG_HISTORY_FILE = "log_history.json"


@dataclass
class RunData:
    """Everything the report shows. `missing` says, in words for the reader, what the run did not provide."""

    run_dir: Path
    config_yaml: str | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)  # pipeline_state.json "stages"
    histories: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # stage -> Trainer log_history
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # role -> metrics
    samples: list[dict[str, Any]] = field(default_factory=list)
    seeds: SeedRuns | None = None  # seeds.json: the run repeated over training seeds
    missing: list[str] = field(default_factory=list)


def _read_json(path: Path, missing: list[str]) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        logger.warning("cannot read %s: %s", path, err)
        missing.append(f"{path.name} in {path.parent} could not be read ({type(err).__name__})")
        return None


def _stage_order(run_dir: Path, stages: list[dict[str, Any]]) -> list[str]:
    """Stages in pipeline order, then any other sub-folder with a log history (e.g. a baseline run)."""
    names = [str(s["name"]) for s in stages if "name" in s]
    extra = sorted(p.parent.name for p in run_dir.glob(f"*/{LOG_HISTORY_FILE}") if p.parent.name not in names)
    return names + extra


def load_run(run_dir: str | Path) -> RunData:
    """Read config, pipeline state, per-stage log histories, metrics and samples from `run_dir`."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LmdistillError(f"no run directory at {run_dir}: pass the output_dir of `lmdistill run`")
    run = RunData(run_dir=run_dir)
    config = run_dir / CONFIG_FILE
    if config.exists():
        run.config_yaml = config.read_text(encoding="utf-8")
    else:
        run.missing.append(f"no {CONFIG_FILE}: the resolved config is not shown")
    state_path = run_dir / STATE_FILE
    state = _read_json(state_path, run.missing) if state_path.exists() else None
    if isinstance(state, dict):
        run.stages = [s for s in state.get("stages", []) if isinstance(s, dict)]
    elif not state_path.exists():
        run.missing.append(f"no {STATE_FILE}: the stage table is not shown")
    for name in _stage_order(run_dir, run.stages):
        path = run_dir / name / LOG_HISTORY_FILE
        if not path.exists():
            run.missing.append(f"stage {name} has no {LOG_HISTORY_FILE}: no curves for it")
            continue
        history = _read_json(path, run.missing)
        if isinstance(history, list):
            run.histories[name] = [entry for entry in history if isinstance(entry, dict)]
    try:
        run.metrics = read_metrics(run_dir)
    except LmdistillError as err:
        run.missing.append(str(err))
    if not run.metrics:
        run.missing.append("no metrics.json: run `lmdistill eval` to compare teacher and students")
    if "baseline" not in run.metrics:
        run.missing.append("no CE-only baseline was evaluated in this run")
    try:
        run.seeds = read_seed_runs(run_dir)
    except LmdistillError as err:
        run.missing.append(str(err))
    run.samples = read_samples(run_dir)
    if not run.samples:
        run.missing.append("no samples.jsonl: no teacher vs student generations to show")
    return run
