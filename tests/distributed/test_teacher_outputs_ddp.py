"""`lmdistill cache-teacher` and `lmdistill generate` under `torchrun --nproc_per_node 2` on CPU: each process takes
its share, the main process merges, the result is the one-process result, and a run killed half-way resumes. The
generations a `non_policy` stage of `lmdistill run` writes itself are split the same way.

Run as a script (under torchrun) this file is the probe: it runs the CLI commands given on its command line,
separated by `+`, in the same processes, and records per process what each command did (PROBE_DIR/NAME-rankR.json).
PROBE_KILL=I:N makes process 1 die (like kill -9) at its N-th unit of work (shard or generate call) of command I.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ROWS, SHARD, BATCH = 16, 4, 4


def _config(tmp_path, teacher_dir, student_dir, text_jsonl, qa_jsonl, stage_kind: str = "distill") -> Path:
    cfg = {
        "teacher": {"name": str(teacher_dir)},
        "student": {"name": str(student_dir)},
        "data": {"max_length": 32, "sources": {"general": {"path": str(text_jsonl), "max_rows": ROWS},
                                               "domain": {"path": str(qa_jsonl), "max_rows": ROWS}},
                 "eval": {"domain": {"path": str(qa_jsonl), "max_rows": 4}}},
        "training": {"batch_size": 4, "report_to": [], "no_cuda": True},
        "teacher_cache": {"k": 8, "shard_examples": SHARD, "batch_size": BATCH},
        "generation": {"max_new_tokens": 4, "batch_size": BATCH, "sources": ["domain"]},
        "evaluation": {"enabled": False, "num_samples": 0},
        "output_dir": str(tmp_path / "run"),
        "stages": [{"name": "s", "kind": stage_kind, "max_steps": 1}],
    }
    path = tmp_path / f"teacher_outputs_{stage_kind}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _launch(tmp_path, name: str, commands: list[list[str]], kill: str | None = None) -> subprocess.CompletedProcess:
    args = [arg for n, command in enumerate(commands) for arg in (["+"] if n else []) + command]
    env = {**os.environ, "PROBE_DIR": str(tmp_path), "PROBE_NAME": name, "OMP_NUM_THREADS": "1"}
    env.pop("PROBE_KILL", None)
    if kill:
        env["PROBE_KILL"] = kill
    return subprocess.run(TORCHRUN + [__file__] + args, env=env, capture_output=True, text=True, timeout=240)


def _probes(tmp_path, name: str) -> list[list[dict]]:
    """Per process, per command: {"shards": [files it wrote], "generate_calls": n}."""
    return [json.loads((tmp_path / f"{name}-rank{r}.json").read_text()) for r in (0, 1)]


def _listed(folder: Path) -> set[str]:
    """Shard files the manifest and any per-process parts list."""
    return {s["file"] for part in folder.glob("manifest*.json") for s in json.loads(part.read_text())["shards"]}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _one_process(command: str, config_path: Path, out: Path):
    """`command` (commands.cache_teacher or .generate) in this single process, on one thread like the launched ones."""
    from lmdistill.config import load_config
    from lmdistill.train import teacher_commands as commands

    return getattr(commands, command)(load_config(config_path), out=out)


@pytest.mark.multiprocess
def test_two_processes_split_cache_and_generations_and_resume(tmp_path, teacher_dir, student_dir, text_jsonl,
                                                              qa_jsonl):
    cfg = _config(tmp_path, teacher_dir, student_dir, text_jsonl, qa_jsonl)
    cache, clean, killed = tmp_path / "cache", tmp_path / "gen_clean.jsonl", tmp_path / "gen_killed.jsonl"
    total_shards = 2 * ROWS // SHARD + 1  # two sources, plus the 4-row eval set in one shard

    # 1. cache-teacher dies on process 1 at its second shard; torchrun stops process 0 too.
    first = _launch(tmp_path, "kill", [["cache-teacher", str(cfg), "--out", str(cache)]], kill="0:2")
    assert first.returncode != 0
    part = json.loads((cache / "manifest.rank-1.json").read_text())["shards"]
    assert len(part) == 1  # process 1 listed the one shard it finished, in its own part of the manifest
    before = _listed(cache)
    assert len(before) < total_shards

    # 2. The same command again: the part is merged, only missing shards run, split over both processes. Then
    #    generate, once cleanly and once killed on process 1 at its second batch.
    second = _launch(tmp_path, "resume", [["cache-teacher", str(cfg), "--out", str(cache)],
                                          ["generate", str(cfg), "--out", str(clean)],
                                          ["generate", str(cfg), "--out", str(killed)]], kill="2:2")
    assert second.returncode != 0, second.stdout[-3000:] + second.stderr[-3000:]
    resumed = _probes(tmp_path, "resume")
    wrote = [set(p[0]["shards"]) for p in resumed]
    assert wrote[0] and wrote[1] and not wrote[0] & wrote[1]
    every = {f"shard-{s:03d}-{i:05d}.safetensors" for s in (0, 1) for i in range(4)} | {"shard-002-00000.safetensors"}
    assert wrote[0] | wrote[1] == every - before
    manifest = json.loads((cache / "manifest.json").read_text())
    assert len(manifest["shards"]) == total_shards and not list(cache.glob("manifest.rank-*"))
    assert not list(cache.glob(".*.tmp"))

    # The merged cache is the one-process cache: same manifest entries, same rows and ids, same log-probs up to
    # float noise.
    _, reference = _one_process("cache_teacher", cfg, tmp_path / "cache_one")
    assert [(s["file"], s["source"], s["start"], s["end"], s["tokens"]) for s in manifest["shards"]] == [
        (s.file, s.source, s.start, s.end, s.tokens) for s in reference.shards]
    for shard in reference.shards:
        a, b = load_file(tmp_path / "cache_one" / shard.file), load_file(cache / shard.file)
        assert all(torch.equal(a[name], b[name]) for name in ("row_ids", "offsets", "ids")), shard.file
        torch.testing.assert_close(a["logprobs"].float(), b["logprobs"].float(), atol=2e-3, rtol=0)

    # Generations of two processes equal those of one (same batches, same seeds), order aside.
    assert resumed[0][1]["generate_calls"] == resumed[1][1]["generate_calls"] == ROWS // BATCH // 2
    _one_process("generate", cfg, tmp_path / "gen_one.jsonl")
    key = lambda line: (line["source"], line["row_id"], line["sample"])  # noqa: E731
    assert sorted(_lines(clean), key=key) == sorted(_lines(tmp_path / "gen_one.jsonl"), key=key)
    assert not list(tmp_path.glob(".gen_clean.jsonl.rank-*"))

    # 3. The killed generation left process 1's first batch in its part; a rerun (here one process) merges it,
    #    keeps every finished row as it was, and generates only the rest.
    part = tmp_path / ".gen_killed.jsonl.rank-1"
    kept = [line for path in (killed, part) for line in _lines(path)]
    assert len(_lines(part)) == BATCH
    _, written = _one_process("generate", cfg, killed)
    final = _lines(killed)
    assert written == ROWS - len(kept) and not part.exists()
    assert sorted(line["row_id"] for line in final) == sorted({line["row_id"] for line in final})
    assert len(final) == ROWS and all(line in final for line in kept)

    # 4. `lmdistill run` with a non_policy stage and no generations yet: both processes generate their half of the
    #    batches before training, and the file is the one-process file.
    run_cfg = _config(tmp_path, teacher_dir, student_dir, text_jsonl, qa_jsonl, stage_kind="non_policy")
    run = _launch(tmp_path, "run", [["run", str(run_cfg)]])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert [p[0]["generate_calls"] for p in _probes(tmp_path, "run")] == [ROWS // BATCH // 2] * 2
    from lmdistill.config import load_config
    from lmdistill.teacher.stage import generations_path

    written = generations_path(load_config(run_cfg))
    assert sorted(_lines(written), key=key) == sorted(_lines(tmp_path / "gen_one.jsonl"), key=key)
    assert json.loads((tmp_path / "run" / "pipeline_state.json").read_text())["stages"][0]["status"] == "done"


def _probe_main() -> None:
    """Run `+`-separated lmdistill commands in this (launched) process, recording what each did."""
    import transformers.generation.utils as generation

    from lmdistill import cli
    from lmdistill.teacher import cache as cache_module

    rank = int(os.environ["RANK"])
    kill_at = os.environ.get("PROBE_KILL")
    kill_command, kill_unit = map(int, kill_at.split(":")) if kill_at else (-1, -1)
    out = Path(os.environ["PROBE_DIR"], f"{os.environ['PROBE_NAME']}-rank{rank}.json")
    records: list[dict] = []

    def unit_of_work() -> None:
        done = len(records[-1]["shards"]) + records[-1]["generate_calls"]
        if rank == 1 and len(records) - 1 == kill_command and done + 1 == kill_unit:
            out.write_text(json.dumps(records))
            os._exit(9)

    write_shard, generate = cache_module._write_shard, generation.GenerationMixin.generate

    def counted_write_shard(path, *args, **kwargs):
        unit_of_work()
        records[-1]["shards"].append(Path(path).name)
        return write_shard(path, *args, **kwargs)

    def counted_generate(self, *args, **kwargs):
        unit_of_work()
        records[-1]["generate_calls"] += 1
        return generate(self, *args, **kwargs)

    cache_module._write_shard = counted_write_shard
    generation.GenerationMixin.generate = counted_generate
    commands, current = [], []
    for arg in sys.argv[1:] + ["+"]:
        if arg == "+":
            commands.append(current)
            current = []
        else:
            current.append(arg)
    for command in commands:
        records.append({"shards": [], "generate_calls": 0})
        sys.argv = ["lmdistill", *command]
        cli.main()
        out.write_text(json.dumps(records))


if __name__ == "__main__":
    _probe_main()
