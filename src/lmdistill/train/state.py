"""Pipeline state on disk (which stages are done and where their students are), written atomically."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE_FILE = "pipeline_state.json"


@dataclass
class StageRecord:
    name: str
    status: str = "pending"  # pending | running | done
    best_path: str | None = None
    final_path: str | None = None
    best_metric: float | None = None
    metric_name: str | None = None


@dataclass
class PipelineState:
    stages: list[StageRecord] = field(default_factory=list)
    final_path: str | None = None

    def record(self, name: str) -> StageRecord:
        for rec in self.stages:
            if rec.name == name:
                return rec
        rec = StageRecord(name=name)
        self.stages.append(rec)
        return rec

    @classmethod
    def load(cls, run_dir: Path) -> "PipelineState":
        path = run_dir / STATE_FILE
        if not path.exists():
            return cls()
        data = json.loads(path.read_text())
        return cls(stages=[StageRecord(**s) for s in data.get("stages", [])], final_path=data.get("final_path"))

    def save(self, run_dir: Path) -> None:
        write_text_atomic(run_dir / STATE_FILE, json.dumps(asdict(self), indent=2))


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def replace_dir_atomic(tmp_dir: Path, final_dir: Path) -> None:
    """Swap a fully written temp folder into place: a reader sees the old folder or the new one, never half of one."""
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)
