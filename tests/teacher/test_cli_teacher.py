"""cache-teacher and generate through the real console script (cached stages and errors are tested in-process)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

LMDISTILL = shutil.which("lmdistill", path=str(Path(sys.executable).parent)) or "lmdistill"


def cli(*args):
    return subprocess.run([LMDISTILL, *map(str, args)], capture_output=True, text=True, timeout=300)


def test_cache_teacher_and_generate_through_the_cli(teacher_config, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(teacher_config(generation={"sources": ["domain"], "batch_size": 16})))

    out = cli("cache-teacher", config, "--k", 16, "--temperature", 2.0, "--out", tmp_path / "cache")
    assert out.returncode == 0, out.stderr
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["k"] == 16 and manifest["temperature"] == 2.0 and len(manifest["shards"]) == 5
    assert "bytes per token" in out.stderr

    out = cli("generate", config, "--num-samples", 1, "--max-new-tokens", 4, "--out", tmp_path / "gen.jsonl")
    assert out.returncode == 0, out.stderr
    assert len((tmp_path / "gen.jsonl").read_text().splitlines()) == 16
