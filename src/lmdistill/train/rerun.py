"""A run directory belongs to one resolved config: a re-run with other settings stops, naming what changed, instead
of skipping finished stages and resuming checkpoints made under the old ones. `--restart` clears the run's outputs."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import yaml

from lmdistill.config import PipelineConfig, config_from_dict
from lmdistill.errors import ConfigError

log = logging.getLogger(__name__)

# Keys that cannot change what is trained or measured: logging, reporting, checkpoint rotation, where the run lives,
# how many workers tokenise or load the data and where tokenised data is cached.
NEUTRAL_KEYS = {"output_dir", "training.logging_steps", "training.report_to", "training.save_total_limit",
                "training.dataloader_num_workers", "evaluation.report", "evaluation.num_samples", "data.num_proc",
                "data.cache_dir", "data.tokenized_cache"}
# What a run writes into its directory, besides one folder per stage. Teacher outputs (teacher_cache/, the
# generations file) stay: they are costly, and the cache checks the teacher and data it was made from. seeds.json:
# the metrics of the run repeated over training seeds (`lmdistill demo --seeds K`).
RUN_FILES = ("pipeline_state.json", "metrics.json", "eval_metrics.json", "samples.jsonl", "report.html", "final",
             "student_init", "seeds.json")
_MISSING = "(unset)"


def _flatten(node, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        items = [(f"{prefix}.{k}" if prefix else str(k), v) for k, v in node.items()]
    elif isinstance(node, list) and any(isinstance(v, (dict, list)) for v in node):
        items = [(f"{prefix}[{i}]", v) for i, v in enumerate(node)]
    else:
        return {prefix: node}
    return {key: value for k, v in items for key, value in _flatten(v, k).items()}


def _as_saved(raw: dict) -> dict:
    """A stored config as the current version resolves it (defaults of keys added since filled in), else raw."""
    try:
        return config_from_dict(raw).model_dump(mode="json", exclude_none=True)
    except ConfigError:
        return raw


def changed_keys(run_dir: Path, config: PipelineConfig, config_file: str) -> list[tuple[str, object, object]]:
    """(key, stored value, new value) for every result-changing key where `config` differs from the one the run
    directory was made with; [] for a new directory."""
    path = run_dir / config_file
    if not path.exists():
        return []
    old = _flatten(_as_saved(yaml.safe_load(path.read_text(encoding="utf-8")) or {}))
    new = _flatten(config.model_dump(mode="json", exclude_none=True))
    keys = sorted(k for k in old.keys() | new.keys()
                  if old.get(k, _MISSING) != new.get(k, _MISSING) and re.sub(r"\[\d+\]", "", k) not in NEUTRAL_KEYS)
    return [(k, old.get(k, _MISSING), new.get(k, _MISSING)) for k in keys]


RUN_WAY_OUT = "pass --restart to start it over with these, or choose a new --output_dir"


def check_same_config(run_dir: Path, config: PipelineConfig, config_file: str, way_out: str = RUN_WAY_OUT) -> None:
    """Raises when `run_dir` was run with other settings, naming them, then `way_out` (what the user can do). A
    stored config with nothing else of a run beside it (an attempt refused before it trained or scored anything, e.g.
    a mistyped data path) binds nothing: the corrected config replaces it."""
    if not _run_outputs(run_dir, config, config_file):
        return
    changes = changed_keys(run_dir, config, config_file)
    if not changes:
        return
    shown = ", ".join(f"{k}: {old} -> {new}" for k, old, new in changes[:6])
    more = f" (and {len(changes) - 6} more)" if len(changes) > 6 else ""
    raise ConfigError(f"{run_dir} was run with other settings ({shown}{more}); {way_out}")


def clear_run(run_dir: Path, config: PipelineConfig, config_file: str) -> None:
    """Delete what a run wrote to `run_dir` (stage folders of the stored and the new config, state, metrics,
    samples, report, final/, the stored config), keeping teacher outputs."""
    for target in [*_run_outputs(run_dir, config, config_file), run_dir / config_file]:
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    log.info("--restart: cleared the previous run in %s (teacher outputs, if any, are kept)", run_dir)


def _run_outputs(run_dir: Path, config: PipelineConfig, config_file: str) -> list[Path]:
    """What a run wrote to `run_dir` that exists (stage folders of the stored and the given config, RUN_FILES),
    besides the stored config and teacher outputs."""
    stored = run_dir / config_file
    stages = {s.name for s in config.stages}
    if stored.exists():
        raw = yaml.safe_load(stored.read_text(encoding="utf-8")) or {}
        stages |= {s.get("name") for s in raw.get("stages", []) if isinstance(s, dict) and s.get("name")}
    names = [name for name in sorted(stages) + list(RUN_FILES)
             if name not in ("", ".", "..") and Path(name).name == name]  # never a path outside the run directory
    return [run_dir / name for name in names if (run_dir / name).exists()]
